"""Handles of first-stage workers (devices) that live in other processes: the same interface
as a local worker (``runtime.handles``).

A protocol calls ``handle.forward(...)``, ``handle.backward(...)`` ... exactly as in-process;
a RemoteWorker sends each call as a request over a ``Transport`` (gRPC streams, Ray actors)
on a thread pool and returns at once, so the requests to a group's devices run at the same
time. ``result()`` waits for the reply (with a deadline), checks it (``wire.schema``),
unpacks it and counts its bytes on the protocol's thread. A reply that fails the checks is
answered with an ``error`` message and raises DeviceDropped: the protocol drops that device
from the round and serves the others.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import NoReturn, Protocol

import torch

from splitfed.adapters.layout import AdapterLayout
from splitfed.runtime.futures import Reply, run_later
from splitfed.runtime.inproc import InProcessLink
from splitfed.topology import Hop
from splitfed.wire.messages import Message, MessageError
from splitfed.wire.schema import Bounds, check, check_reply

log = logging.getLogger("splitfed.remote")


class DeviceLost(ConnectionError):
    """The device disconnected, or did not answer before its deadline."""


class Transport(Protocol):
    """Delivers requests to devices living elsewhere and brings back their replies."""

    def request(self, device: int, message: Message, timeout_s: float) -> tuple[Message, int, int]:
        """Send ``message``, wait for the reply; returns (reply, bytes sent, bytes received).

        Raises DeviceLost (gone or too slow) or MessageError (the reply is not a valid message).
        """

    def notify(self, device: int, message: Message) -> None:
        """Send ``message`` without waiting for a reply (errors, stop); a lost device is ignored."""

    def wait_for(self, devices: list[int], timeout_s: float) -> list[int]:
        """Wait until ``devices`` are reachable (or the timeout passes); return the reachable ones."""


class DeviceDropped(ConnectionError):
    """A device left the round: disconnected, too slow, or sent a message that failed the checks."""

    def __init__(self, device: int, reason: str) -> None:
        super().__init__(f"device {device} dropped: {reason}")
        self.device = device
        self.reason = reason


def _acknowledged(reply: Reply[Message]) -> Reply[None]:
    """A reply whose content does not matter once it has arrived and passed the checks (an ack)."""

    def wait() -> None:
        reply.result()

    return Reply(wait)


@dataclass(frozen=True)
class Limits:
    """What a valid reply of a device may contain (``bounds``, from the model and the config), and how long it may take."""

    bounds: Bounds
    timeout_s: float


class RemoteWorker:
    """A device's first-stage worker in another process."""

    def __init__(self, device_id: int, name: str, hop: Hop, aggregator_hop: Hop, transport: Transport,
                 link: InProcessLink, pool: ThreadPoolExecutor, limits: Limits) -> None:
        self.id = device_id
        self.name = name
        self.hop = hop
        """Forward hop of the device's route (device -> next stage): step traffic."""
        self.aggregator_hop = aggregator_hop
        """Device -> aggregator: adapter traffic."""
        self.transport = transport
        self.link = link
        self.pool = pool
        self.limits = limits
        self.bounds = limits.bounds
        """What this device may send; the first download fixes its adapter's exact shapes (its rank)."""
        self._report: dict | None = None

    # --- transport ------------------------------------------------------------------------
    def _request(self, message: Message, reply_kind: str, adapter: bool = False) -> Reply[Message]:
        """Send a request (packed by the codec) now; the reply is counted, unpacked and checked in ``result()``."""
        codec = self.link.codec
        packed = codec.pack("down", self.id, message)
        hop = self.aggregator_hop if adapter else self.hop

        def finish(outcome: object) -> Message:
            if isinstance(outcome, DeviceLost):
                raise DeviceDropped(self.id, str(outcome))
            if isinstance(outcome, MessageError):
                self._refuse(message, str(outcome))
            reply, sent, received = outcome
            self.link.record(hop.reverse(), self.id, sent, "down", message.kind)
            self.link.record(hop, self.id, received, "up", reply_kind)
            codec.tally(packed, sent)
            try:
                dense = codec.unpack(self.id, reply) if reply.kind == reply_kind else reply
                checked = check_reply(dense, self.bounds, kind=reply_kind, round_index=message.round,
                                      step=message.step, sender=self.name)
            except MessageError as error:
                self._refuse(message, str(error))
            codec.tally(reply, received)
            return checked

        def send() -> object:
            try:
                return self.transport.request(self.id, packed, self.limits.timeout_s)
            except (DeviceLost, MessageError) as error:
                return error

        return run_later(self.pool, send, finish)

    def screen(self, message: Message) -> None:
        """Check a message of this device against its kind's schema (MessageError if it fails)."""
        check(self.link.codec.unpack(self.id, message), self.bounds)

    def _call(self, op: str, round_index: int = 0, step: int = 0, **values: float | str) -> Message:
        return Message("call", "server", round_index, step, values={"op": op, **values})

    # --- the worker handle interface ------------------------------------------------------------
    def forward(self, slot: str, round_index: int, step: int) -> Reply[Message]:
        return self._request(self._call("forward", round_index, step), "activations")

    def backward(self, slot: str, message: Message) -> Reply[Message]:
        return self._request(message, "grad_norm")

    def apply(self, slot: str, message: Message, lr: float) -> Reply[None]:
        message.values["lr"] = lr
        return _acknowledged(self._request(message, "ack"))

    def local_step(self, slot: str, lr: float) -> Reply[tuple[float, int]]:
        reply = self._request(self._call("local_step", lr=lr), "ack")

        def result() -> tuple[float, int]:
            values = reply.result().values
            if "loss" not in values or "tokens" not in values:
                self._refuse(reply.result(), "a local_step ack must carry loss and tokens")
            return float(values["loss"]), int(values["tokens"])

        return Reply(result)

    def upload(self, slot: str, round_index: int) -> Reply[Message]:
        return self._request(self._call("upload", round_index), "adapter_upload", adapter=True)

    def download(self, slot: str, message: Message) -> Reply[None]:
        if self.bounds.adapter is None:  # the device's own slice of the global adapter: its exact shapes
            self.bounds = replace(self.bounds, adapter={k: tuple(v.shape) for k, v in message.tensors.items()})
        return _acknowledged(self._request(message, "ack", adapter=True))

    def merge(self, slot: str, message: Message) -> Reply[None]:
        return _acknowledged(self._request(message, "ack", adapter=True))

    def measure_importance(self, slot: str, targets: list[str], passes: int) -> Reply[None]:
        """The device measures the targets it holds (its config names them) over its next ``passes`` forward passes."""
        return _acknowledged(self._request(self._call("measure_importance", passes=passes), "ack"))

    def importance(self, slot: str, round_index: int) -> Reply[Message]:
        return self._request(self._call("importance", round_index), "importance", adapter=True)

    def relayout(self, slot: str, layout: AdapterLayout, dropout: float) -> Reply[None]:
        """The device rebuilds its adapter with ``layout``'s placement; the next download fixes its new shapes."""
        placement = json.dumps({f"{layer}.{path}": rank for layer, path, rank in layout.placement})
        self.bounds = replace(self.bounds, adapter=None)
        return _acknowledged(self._request(self._call("relayout", placement=placement), "ack"))

    def forward_group(self, groups):  # noqa: ANN001 - devices run first stages only
        raise NotImplementedError(f"{self.name}: a remote device runs a first stage only")

    backward_group = forward_group

    def sq_norm(self, slot: str) -> float:
        raise NotImplementedError(f"{self.name}: a device reports its norm in its grad_norm reply")

    def discard(self, slot: str) -> None:
        """Nothing to do here: a device discards an unfinished step's gradients at its next forward."""

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        message = self._request(self._call("export_state"), "role_state").result()
        return message.tensors, json.loads(str(message.values["meta"]))  # a JSON object: checked by the schema

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        message = Message("role_state", "server", 0, 0, tensors, {"meta": json.dumps(meta)})
        self._request(message, "ack").result()

    def stop(self) -> None:
        self.transport.notify(self.id, self._call("stop"))

    def _refuse(self, message: Message, reason: str) -> NoReturn:
        """Answer a bad reply with a short error message and drop the device from the round."""
        reason = reason[:500]
        log.warning("device %d: rejected message: %s", self.id, reason)
        self.transport.notify(self.id, Message("error", "server", message.round, message.step, values={"reason": reason}))
        raise DeviceDropped(self.id, f"bad message: {reason}")

    # --- accounting (reported by the device process) -----------------------------------------
    def _reported(self) -> dict:
        """The device's own memory report; zeros (logged) if it cannot be reached at the end."""
        if self._report is None:
            try:
                self._report = self._request(self._call("report"), "ack").result().values
                if not {"peak_bytes", "trainable_params"} <= self._report.keys():
                    raise DeviceDropped(self.id, "its report lacks peak_bytes or trainable_params")
            except DeviceDropped as error:
                log.warning("device %d: no memory report: %s", self.id, error.reason)
                self._report = {"peak_bytes": 0, "trainable_params": 0}
        return self._report

    def peak_bytes(self) -> int:
        return int(self._reported()["peak_bytes"])

    @property
    def trainable_params(self) -> int:
        return int(self._reported()["trainable_params"])


class RemoteDevices:
    """The devices of a run reached over one transport: creates their handles, runs their
    requests concurrently (one thread per device), and stops them at the end."""

    def __init__(self, transport: Transport, limits: Limits, concurrent: bool = True) -> None:
        self.transport = transport
        self.limits = limits
        self.concurrent = concurrent
        """False: requests run one at a time (to measure what concurrency buys)."""
        self.handles: dict[int, RemoteWorker] = {}
        self._pool: ThreadPoolExecutor | None = None

    def handle(self, device: int, name: str, hop: Hop, aggregator_hop: Hop, link: InProcessLink) -> RemoteWorker:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=64 if self.concurrent else 1,
                                            thread_name_prefix="splitfed-request")
        handle = RemoteWorker(device, name, hop, aggregator_hop, self.transport, link, self._pool, self.limits)
        self.handles[device] = handle
        return handle

    def screen(self, device: int, message: Message) -> None:
        """Check a message that device ``device`` sent against its kind's schema (MessageError if it fails)."""
        handle = self.handles.get(device)
        if handle is not None:
            handle.screen(message)

    def stop_all(self) -> None:
        for handle in self.handles.values():
            handle.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

"""Handles of first-stage workers (devices) that live in other processes: the same interface
as a local worker (``runtime.handles``).

A protocol calls ``handle.forward(...)``, ``handle.backward(...)`` ... exactly as in-process;
a RemoteWorker sends each call as a request over a ``Transport`` (gRPC streams, Ray actors)
on a thread pool and returns at once, so the requests to a group's devices run at the same
time. ``result()`` waits for the reply (with a deadline), checks it (``wire.validate``),
unpacks it and counts its bytes on the protocol's thread. A reply that fails the checks is
answered with an ``error`` message and raises DeviceDropped: the protocol drops that device
from the round and serves the others.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from splitfed.runtime.futures import Reply, run_later
from splitfed.runtime.inproc import InProcessLink
from splitfed.topology import Hop
from splitfed.wire.messages import Message, MessageError
from splitfed.wire.validate import Expectation, TensorSpec, validate

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
    """What a valid reply of a device may contain (from the model and the config)."""

    hidden_size: int
    vocab_size: int
    seq_len: int
    max_batch: int
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
        self._adapter_shapes: dict[str, tuple[int | None, ...]] | None = None
        self._report: dict | None = None

    # --- transport ------------------------------------------------------------------------
    def _request(self, message: Message, expected: Expectation, adapter: bool = False) -> Reply[Message]:
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
            self.link.record(hop, self.id, received, "up", expected.kind)
            codec.tally(packed, sent)
            try:
                dense = codec.unpack(self.id, reply) if reply.kind == expected.kind else reply
                checked = validate(dense, expected)
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

    def _call(self, op: str, round_index: int = 0, step: int = 0, **values: float) -> Message:
        return Message("call", "server", round_index, step, values={"op": op, **values})

    # --- the worker handle interface ------------------------------------------------------------
    def forward(self, slot: str, round_index: int, step: int) -> Reply[Message]:
        limits = self.limits
        seq, batch_axis = limits.seq_len, None
        expected = Expectation("activations", round_index, step, {
            "hidden": TensorSpec((batch_axis, seq, limits.hidden_size), torch.float32, finite=True),
            "attention_mask": TensorSpec((batch_axis, seq), torch.int64, value_range=(0, 2)),
            "labels": TensorSpec((batch_axis, seq), torch.int64, value_range=(0, limits.vocab_size),
                                 extra_values=(-100,)),
        })
        reply = self._request(self._call("forward", round_index, step), expected)

        def checked() -> Message:
            message = reply.result()
            sizes = {t.shape[0] for t in message.tensors.values()}
            if len(sizes) != 1 or sizes.pop() > limits.max_batch:
                self._refuse(message, f"batch sizes {sorted({t.shape[0] for t in message.tensors.values()})} "
                                      f"differ or exceed train.batch_size={limits.max_batch}")
            return message

        return Reply(checked)

    def backward(self, slot: str, message: Message) -> Reply[Message]:
        expected = Expectation("grad_norm", message.round, message.step, finite_values=("sq_norm",))
        reply = self._request(message, expected)

        def checked() -> Message:
            answer = reply.result()
            if answer.values["sq_norm"] < 0:
                self._refuse(answer, "sq_norm is negative")
            return answer

        return Reply(checked)

    def apply(self, slot: str, message: Message, lr: float) -> Reply[None]:
        message.values["lr"] = lr
        reply = self._request(message, Expectation("ack", message.round, message.step))
        return _acknowledged(reply)

    def local_step(self, slot: str, lr: float) -> Reply[tuple[float, int]]:
        reply = self._request(self._call("local_step", lr=lr), Expectation("ack", 0, 0, finite_values=("loss", "tokens")))
        return Reply(lambda: (float(reply.result().values["loss"]), int(reply.result().values["tokens"])))

    def upload(self, slot: str, round_index: int) -> Reply[Message]:
        shapes = self._adapter_shapes or {}
        expected = Expectation(
            "adapter_upload", round_index, 0,
            {k: TensorSpec(s, torch.float32, finite=True) for k, s in shapes.items()},
            exact_tensors=bool(shapes), finite_values=("num_samples",),
        )
        return self._request(self._call("upload", round_index), expected, adapter=True)

    def download(self, slot: str, message: Message) -> Reply[None]:
        if self._adapter_shapes is None:  # the first download fixes the adapter's layout; ranks may differ
            self._adapter_shapes = {
                k: (None, v.shape[1]) if ".lora_A." in k else (v.shape[0], None) for k, v in message.tensors.items()
            }
        reply = self._request(message, Expectation("ack", message.round, message.step), adapter=True)
        return _acknowledged(reply)

    def forward_group(self, groups):  # noqa: ANN001 - devices run first stages only
        raise NotImplementedError(f"{self.name}: a remote device runs a first stage only")

    backward_group = forward_group

    def sq_norm(self, slot: str) -> float:
        raise NotImplementedError(f"{self.name}: a device reports its norm in its grad_norm reply")

    def discard(self, slot: str) -> None:
        """Nothing to do here: a device discards an unfinished step's gradients at its next forward."""

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        reply = self._request(self._call("export_state"), Expectation("role_state", 0, 0, exact_tensors=False))
        message = reply.result()
        try:
            meta = json.loads(message.values["meta"])
        except (ValueError, TypeError) as error:
            self._refuse(message, f"role_state meta is not JSON: {error}")
        return message.tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        message = Message("role_state", "server", 0, 0, tensors, {"meta": json.dumps(meta)})
        self._request(message, Expectation("ack", 0, 0)).result()

    def stop(self) -> None:
        self.transport.notify(self.id, self._call("stop"))

    def _refuse(self, message: Message, reason: str) -> None:
        """Answer a bad reply with an error message and drop the device from the round."""
        log.warning("device %d: rejected message: %s", self.id, reason)
        self.transport.notify(self.id, Message("error", "server", message.round, message.step, values={"reason": reason}))
        raise DeviceDropped(self.id, f"bad message: {reason}")

    # --- accounting (reported by the device process) -----------------------------------------
    def _reported(self) -> dict:
        """The device's own memory report; zeros (logged) if it cannot be reached at the end."""
        if self._report is None:
            expected = Expectation("ack", 0, 0, finite_values=("peak_bytes", "trainable_params"))
            try:
                self._report = self._request(self._call("report"), expected).result().values
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

    def stop_all(self) -> None:
        for handle in self.handles.values():
            handle.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import NoReturn, Protocol

import torch

from splitfed.adapters.layout import AdapterLayout
from splitfed.runtime.futures import Reply, run_later
from splitfed.runtime.inproc import InProcessLink
from splitfed.topology import Hop, Topology
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
                 link: InProcessLink, pool: ThreadPoolExecutor, limits: Limits, relayed: bool = False,
                 route: int | None = None, coded: bool = True) -> None:
        self.id = device_id
        """Its stream (peer id): a device's index, or a slot of an edge (``topology.edge_peers``)."""
        self.name = name
        self.relayed = relayed
        """A user behind an edge: the edge keeps its activations and gradients (the cloud gets ``held``
        receipts that say how many bytes they took on the user's hop)."""
        self.route = device_id if route is None else route
        """The route its traffic is counted for."""
        self.coded = coded
        """Messages pass the route's codecs (a device's access hop; an edge's backhaul does not)."""
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
    def _request(self, message: Message, reply_kind: str, adapter: bool = False,
                 count: Callable[[int, int], None] | None = None) -> Reply[Message]:
        """Send a request (packed by the codec) now; the reply is counted, unpacked and checked in ``result()``.
        ``count(sent, received)``: counts the bytes in place of the default (receipts of an edge, groups of routes)."""
        codec = self.link.codec
        packed = codec.pack("down", self.id, message) if self.coded else message
        hop = self.aggregator_hop if adapter else self.hop

        def finish(outcome: object) -> Message:
            if isinstance(outcome, DeviceLost):
                raise DeviceDropped(self.route, str(outcome))
            if isinstance(outcome, MessageError):
                self._refuse(message, str(outcome))
            reply, sent, received = outcome
            if count is not None:
                count(sent, received)
            else:
                self.link.record(hop.reverse(), self.route, sent, "down", message.kind)
                self.link.record(hop, self.route, received, "up", reply_kind)
            if self.coded:
                codec.tally(packed, sent)
            try:
                dense = codec.unpack(self.id, reply) if reply.kind == reply_kind and self.coded else reply
                checked = check_reply(dense, self.bounds, kind=reply_kind, round_index=message.round,
                                      step=message.step, sender=self.name)
            except MessageError as error:
                self._refuse(message, str(error))
            if self.coded:
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
        if not self.relayed:
            return self._request(self._call("forward", round_index, step), "activations")
        call = self._call("forward", round_index, step)
        receipt = self._request(call, "held", count=lambda sent, _: self._record(self.hop.reverse(), sent, "call"))
        return self._count_held(receipt, self.hop, "activations")

    def backward(self, slot: str, message: Message) -> Reply[Message]:
        """``message``: the activation gradient, or (relayed) the edge's receipt for the one it holds."""
        if not self.relayed:
            return self._request(message, "grad_norm")
        self._record(self.hop.reverse(), int(message.values.get("bytes", 0)), "activation_grad")
        return self._request(message, "grad_norm", count=lambda _, received: self._record(self.hop, received, "grad_norm"))

    def _record(self, hop: Hop, nbytes: int, kind: str) -> None:
        self.link.record(hop, self.route, nbytes, "up" if hop == self.hop else "down", kind)

    def _count_held(self, receipt: Reply[Message], hop: Hop, kind: str) -> Reply[Message]:
        """Count the bytes an edge measured on the user's hop for what it holds, when its receipt arrives."""

        def result() -> Message:
            held = receipt.result()
            self._record(hop, int(held.values.get("bytes", 0)), kind)
            return held

        return Reply(result)

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
        reply = self._request(self._call("upload", round_index), "adapter_upload", adapter=True)
        if not self.coded:  # a middle stage's adapter carries no sample weight
            return reply

        def result() -> Message:
            if "num_samples" not in reply.result().values:
                self._refuse(reply.result(), "a device's adapter_upload must carry num_samples")
            return reply.result()

        return Reply(result)

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

    def relayout(self, slot: str, layout: AdapterLayout) -> Reply[None]:
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
        log.warning("%s: rejected message: %s", self.name, reason)
        self.transport.notify(self.id, Message("error", "server", message.round, message.step, values={"reason": reason}))
        raise DeviceDropped(self.route, f"bad message: {reason}")

    # --- accounting (reported by the device process) -----------------------------------------
    def _reported(self) -> dict:
        """The device's own memory report; zeros (logged) if it cannot be reached at the end."""
        if self._report is None:
            try:
                self._report = self._request(self._call("report"), "ack").result().values
                if not {"peak_bytes", "trainable_params"} <= self._report.keys():
                    raise DeviceDropped(self.route, "its report lacks peak_bytes or trainable_params")
            except DeviceDropped as error:
                log.warning("%s: no memory report: %s", self.name, error.reason)
                self._report = {"peak_bytes": 0, "trainable_params": 0}
        return self._report

    def peak_bytes(self) -> int:
        return int(self._reported()["peak_bytes"])

    @property
    def trainable_params(self) -> int:
        return int(self._reported()["trainable_params"])


class RemoteStage:
    """A middle-stage worker (an edge server) in another process: one stream per adapter slot.

    Its users' activations and gradients stay at the edge: ``forward_group`` asks it to forward what it
    holds for the routes (their ``held`` receipts say how much), ``backward_group`` sends the gradients
    of its outputs and returns receipts for the gradients it now holds for its users. The slots' streams
    run at the same time; each route's share of a group message is counted on its own hop.
    """

    def __init__(self, name: str, slots: dict[str, RemoteWorker], topology: Topology) -> None:
        self.name = name
        self.slots = slots
        self.topology = topology
        self._sq_norms: dict[str, float] = {}

    def _hop(self, route: int) -> Hop:
        """The forward hop from this worker to the next stage of ``route``."""
        return next(h for h in self.topology.routes[route].hops if h.src == self.name)

    def _count(self, sizes: dict[int, int], nbytes: int, direction: str, kind: str) -> None:
        """Share ``nbytes`` among the routes of a group message by their batch sizes."""
        total = max(sum(sizes.values()), 1)
        link = next(iter(self.slots.values())).link
        for route, size in sizes.items():
            hop = self._hop(route) if direction == "up" else self._hop(route).reverse()
            link.record(hop, route, nbytes * size // total, direction, kind)

    def forward_group(self, groups: dict[str, list[tuple[int, Message]]]) -> Reply[dict[int, Message]]:
        pending = []
        for slot, arrivals in groups.items():
            sizes = {u: int(m.values["batch"]) for u, m in arrivals}  # receipts of the activations it holds
            first = arrivals[0][1]
            stream = self.slots[slot]
            call = Message("call", "server", first.round, first.step,
                           values={"op": "forward_group", "routes": json.dumps({str(u): b for u, b in sizes.items()})})
            stream.bounds = replace(stream.bounds, batch=sum(sizes.values()))
            count = lambda _, received, sizes=sizes: self._count(sizes, received, "up", "activations")  # noqa: E731
            pending.append((sizes, first, stream._request(call, "activations", count=count)))

        def result() -> dict[int, Message]:
            replies = {}
            for sizes, first, reply in pending:
                message = reply.result()
                parts = {k: t.split(list(sizes.values())) for k, t in message.tensors.items()}
                for i, u in enumerate(sizes):
                    replies[u] = Message("activations", self.name, first.round, first.step,
                                         {k: v[i] for k, v in parts.items()})
            return replies

        return Reply(result)

    def backward_group(self, groups: dict[str, list[tuple[int, Message]]]) -> Reply[dict[int, Message]]:
        pending = []
        for slot, arrivals in groups.items():
            first = arrivals[0][1]
            routes = {str(u): [int(m.tensors["grad"].shape[0]), float(m.values["loss"]), int(m.values["tokens"]),
                               float(m.values["grad_scale"])] for u, m in arrivals}
            grad = Message("group_grad", "server", first.round, first.step,
                           {"grad": torch.cat([m.tensors["grad"] for _, m in arrivals])}, {"routes": json.dumps(routes)})
            sizes = {u: int(m.tensors["grad"].shape[0]) for u, m in arrivals}
            count = lambda sent, _, sizes=sizes: self._count(sizes, sent, "down", "activation_grad")  # noqa: E731
            pending.append((slot, arrivals, self.slots[slot]._request(grad, "ack", count=count)))

        def result() -> dict[int, Message]:
            receipts = {}
            for slot, arrivals, reply in pending:
                values = reply.result().values
                sent = _json_counts(values.get("bytes", "{}"))
                if "sq_norm" not in values or set(sent) != {u for u, _ in arrivals}:
                    self.slots[slot]._refuse(reply.result(), "a group_grad ack must carry sq_norm and the bytes of "
                                                             "every route's gradient")
                self._sq_norms[slot] = float(values["sq_norm"])
                for u, m in arrivals:
                    receipts[u] = Message("held", self.name, m.round, m.step,
                                          values={"batch": int(m.tensors["grad"].shape[0]), "bytes": sent[u],
                                                  **{k: m.values[k] for k in ("loss", "tokens", "grad_scale")}})
            return receipts

        return Reply(result)

    def sq_norm(self, slot: str) -> float:
        return self._sq_norms.get(slot, 0.0)

    def apply(self, slot: str, message: Message, lr: float) -> Reply[None]:
        return self.slots[slot].apply(slot, message, lr)

    def discard(self, slot: str) -> None:
        """Nothing to send: the edge discards an unfinished step at its slot's next forward."""

    def upload(self, slot: str, round_index: int) -> Reply[Message]:
        return self.slots[slot].upload(slot, round_index)

    def download(self, slot: str, message: Message) -> Reply[None]:
        return self.slots[slot].download(slot, message)

    def merge(self, slot: str, message: Message) -> Reply[None]:
        return self.slots[slot].merge(slot, message)

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = {}, {}
        for stream in self.slots.values():
            slot_tensors, slot_meta = stream.export_state()
            tensors.update(slot_tensors)
            meta.update(slot_meta)
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for slot, stream in self.slots.items():
            if slot in meta:
                prefix = f"{slot}/"
                stream.import_state({k: v for k, v in tensors.items() if k.startswith(prefix)}, {slot: meta[slot]})

    def peak_bytes(self) -> int:
        return next(iter(self.slots.values())).peak_bytes()  # every stream reports the one worker

    @property
    def trainable_params(self) -> int:
        return next(iter(self.slots.values())).trainable_params

    def _unsupported(self, *args, **kwargs):  # noqa: ANN002, ANN003
        raise NotImplementedError(f"{self.name}: a remote middle stage runs forward_group / backward_group only")

    forward = backward = local_step = measure_importance = importance = relayout = _unsupported


def _json_counts(text: object) -> dict[int, int]:
    """{"<route>": bytes} of an edge's ack as {route: bytes}; {} if it is not that."""
    try:
        counts = json.loads(str(text))
        return {int(k): int(v) for k, v in counts.items() if str(k).isdigit() and isinstance(v, int) and v >= 0}
    except (ValueError, AttributeError):
        return {}


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

    def handle(self, device: int, name: str, hop: Hop, aggregator_hop: Hop, link: InProcessLink,
               relayed: bool = False) -> RemoteWorker:
        """The handle of device ``device``'s first stage (``relayed``: behind an edge that keeps its activations)."""
        handle = RemoteWorker(device, name, hop, aggregator_hop, self.transport, link, self._requests(), self.limits,
                              relayed=relayed)
        self.handles[device] = handle
        return handle

    def stage(self, name: str, slots: dict[str, tuple[int, int, int]], topology: Topology,
              link: InProcessLink) -> RemoteStage:
        """The handle of middle-stage worker ``name`` whose slots are reached on streams ``slots``:
        slot -> (peer id, owner route of its adapter traffic, largest batch of one group)."""
        streams = {}
        for slot, (peer, owner, max_batch) in slots.items():
            step_hop = next(h for r in topology.routes for h in r.hops if h.src == name)
            limits = replace(self.limits, bounds=replace(self.limits.bounds, max_batch=max_batch))
            streams[slot] = RemoteWorker(peer, name, step_hop, Hop(name, topology.aggregator), self.transport, link,
                                         self._requests(), limits, route=owner, coded=False)
            self.handles[peer] = streams[slot]
        return RemoteStage(name, streams, topology)

    def _requests(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=64 if self.concurrent else 1,
                                            thread_name_prefix="splitfed-request")
        return self._pool

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

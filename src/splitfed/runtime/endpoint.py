"""A device process's side of the protocol: turn each request into a call on its stage worker.

Transport-agnostic: ``serve_device`` reads messages from any session with ``receive`` and
``send``. Compressed tensors are unpacked on arrival and replies packed with the run's
codecs (``wire.compression``), so the worker itself never sees codecs. Every request is
checked before the worker sees it, as strictly as the server checks replies: its sender
(one of the server's roles), its kind's schema with this device's bounds (its exact
adapter shapes; a gradient's batch equals the pending forward's). A request that fails,
whatever it raises, is answered with a short ``error`` message; the process keeps serving
until the server says ``stop`` or the connection ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from splitfed.adapters.layout import AdapterLayout
from splitfed.roles.worker import StageWorker
from splitfed.runtime.refusals import Tally
from splitfed.wire.compression import MessageCodec
from splitfed.wire.messages import Message, MessageError, shown
from splitfed.wire.schema import Bounds, check

log = logging.getLogger("splitfed.device")


CODEC_STATE = "codec/"
"""Prefix of the device's error-feedback residuals in its exported state."""


@dataclass
class HostedDevice:
    """A device's first-stage worker in this process, and the device index its codec streams use."""

    id: int
    worker: StageWorker
    bounds: Bounds
    """What the server may send this device (its adapter's exact shapes included)."""
    servers: frozenset[str]
    """Senders the server's messages may name: the roles the server process runs for this device."""
    trace: Path | None = None
    """Where to append one JSON line per request served (``runtime.trace_dir``), or None."""
    refused: Tally = field(default_factory=lambda: Tally("server request"), compare=False)
    """Requests answered with an error so far."""
    layout: AdapterLayout | None = None
    """The device's adapter layout (its targets; a placement the server may change with ``relayout``)."""
    slot: str | None = None
    """The worker's slot this stream serves (an edge serves each of its slots on a stream of its own);
    None: the worker's only slot."""
    operations: dict[str, Callable[[Message], Message]] = field(default_factory=dict, compare=False)
    """Operations beyond a device's (an edge's ``forward_group`` and ``backward_group``), by name."""
    guard: AbstractContextManager = field(default_factory=nullcontext, compare=False)
    """Held while a request runs: streams of one process that share a model take turns."""
    coded: bool = True
    """Its messages pass the run's codecs (a device's access hop); an edge's slot streams (backhaul) do not."""

    @property
    def name(self) -> str:
        return self.worker.name

    def record(self, op: str, message: Message, started: float, ended: float) -> None:
        if self.trace is None:
            return
        line = {"worker": self.name, "op": op, "round": message.round, "step": message.step,
                "start": started, "end": ended}
        with self.trace.open("a") as handle:
            handle.write(json.dumps(line) + "\n")


OPERATIONS = {"activation_grad": "backward", "clip_scale": "apply", "adapter_download": "download",
              "adapter_merge": "merge", "role_state": "import_state", "group_grad": "backward_group"}
"""What a request of each data kind asks the worker to do (a ``call`` names its op itself)."""


def operation(message: Message) -> str:
    if message.kind == "call":
        return str(message.values.get("op"))
    return OPERATIONS.get(message.kind, message.kind)


def handle(device: HostedDevice, message: Message, codec: MessageCodec) -> Message:
    """The reply to one (unpacked) request."""
    r, s, name, worker, slot = message.round, message.step, device.name, device.worker, device.slot
    op = operation(message)
    if op in device.operations:
        return device.operations[op](message)
    if op == "forward":
        return worker.forward(slot, r, s)
    if op == "backward":
        return worker.backward(slot, message)
    if op == "apply":
        worker.apply(slot, float(message.values["scale"]), float(message.values["lr"]))
        return Message("ack", name, r, s)
    if op == "local_step":
        loss, tokens = worker.local_step(slot, float(message.values["lr"]))
        return Message("ack", name, r, s, values={"loss": loss, "tokens": tokens})
    if op == "upload":
        return worker.upload(slot, r)
    if op == "download":
        worker.download(slot, message)
        return Message("ack", name, r, s)
    if op == "merge":
        worker.merge(slot, message)
        return Message("ack", name, r, s)
    if op == "measure_importance":
        worker.measure_importance(slot, list(device.layout.targets), int(message.values.get("passes", 1)))
        return Message("ack", name, r, s)
    if op == "importance":
        return worker.importance(slot, r)
    if op == "relayout":
        layout = requested_layout(device, str(message.values.get("placement", "{}")))
        worker.relayout(slot, layout)
        device.layout = layout
        device.bounds = replace(device.bounds, adapter=worker.slot(slot).shapes())
        return Message("ack", name, r, s)
    if op == "export_state":
        tensors, meta = worker.export_state([slot] if slot else None)
        tensors.update({CODEC_STATE + k: v for k, v in codec.export_state(device.id).items()})
        return Message("role_state", name, r, s, tensors, {"meta": json.dumps(meta)})
    if op == "import_state":
        own = {k: v for k, v in message.tensors.items() if not k.startswith(CODEC_STATE)}
        worker.import_state(own, json.loads(str(message.values["meta"])))
        codec.import_state({k[len(CODEC_STATE):]: v for k, v in message.tensors.items() if k.startswith(CODEC_STATE)})
        return Message("ack", name, r, s)
    if op == "report":
        return Message("ack", name, r, s, values={"peak_bytes": worker.peak_bytes(),
                                                  "trainable_params": worker.trainable_params})
    raise MessageError(f"unknown request {op!r}")


def requested_layout(device: HostedDevice, placement: str) -> AdapterLayout:
    """The layout a ``relayout`` request asks for: ``{"<layer>.<module path>": rank}``, every matrix one of
    this device's target modules, every rank an integer in 1 .. the largest rank allowed; else MessageError."""
    ranks = json.loads(placement)  # a JSON object: the schema checked it
    known, prefix = device.bounds.merge_modules or {}, device.worker.slot(device.slot).stage.family.layers_path + "."
    chosen = []
    for matrix, rank in ranks.items():
        layer, _, path = matrix.partition(".")
        if not layer.isdigit() or f"{prefix}{layer}.{path}" not in known:
            raise MessageError(f"relayout: {shown(matrix)} is not a target module of this device's layers")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= device.bounds.max_merge_rank:
            raise MessageError(f"relayout: rank {shown(rank)} of {shown(matrix)}; allowed: 1..{device.bounds.max_merge_rank}")
        chosen.append((int(layer), path, rank))
    if not chosen:
        raise MessageError("relayout: the placement names no matrix")
    return device.layout.with_placement(tuple(sorted(chosen)))


def is_stop(message: Message) -> bool:
    return message.kind == "call" and message.values.get("op") == "stop"


REQUESTS = ("activation_grad", "clip_scale", "adapter_download", "adapter_merge", "call", "role_state", "group_grad")
"""Kinds the server sends a device as requests (an ``error`` is a notice that needs no answer)."""


def checked_request(device: HostedDevice, message: Message, codec: MessageCodec) -> Message:
    """The unpacked request if it is one this device may be sent; else MessageError naming what is wrong."""
    if message.kind not in REQUESTS:
        raise MessageError(f"a {message.kind} message is not a request a device answers")
    if message.sender not in device.servers:
        raise MessageError(f"sender {shown(message.sender, 40)} is not one of the server's roles "
                           f"{sorted(device.servers)}")
    dense = codec.unpack(device.id, message) if device.coded else message
    bounds = device.bounds
    if message.kind in ("activation_grad", "group_grad"):
        pending = device.worker.slot(device.slot).pending
        if pending is None:
            raise MessageError(f"{message.kind} without a pending forward pass")
        bounds = replace(bounds, batch=int(pending.outputs.shape[0]))
    return check(dense, bounds)


def respond(device: HostedDevice, message: Message, codec: MessageCodec) -> Message | None:
    """The packed reply to a request (a short ``error`` message if it fails), or None if none is due
    (an error notice, or a valid stop)."""
    if message.kind == "error":  # the server refused our last reply; it expects nothing back
        log.warning("%s: server refused our message: %s", device.name, shown(message.values.get("reason"), 300))
        return None
    try:
        request = checked_request(device, message, codec)
        if is_stop(request):
            return None
        started = time.time()
        with device.guard:
            reply = handle(device, request, codec)
        device.record(operation(message), message, started, time.time())
        return codec.pack("up", device.id, reply) if device.coded else reply
    except Exception as error:  # noqa: BLE001 - whatever a request makes the worker raise, the device answers
        text = str(error) if isinstance(error, MessageError) else shown(str(error), 300)
        return refusal(device, f"{message.kind} request failed: {text}"[:500], message.round, message.step)


def wants_stop(device: HostedDevice, message: Message, codec: MessageCodec) -> bool:
    """True for a valid stop request from the server."""
    if not is_stop(message):
        return False
    try:
        checked_request(device, message, codec)
    except Exception:  # noqa: BLE001 - not a valid stop: respond() answers it with an error
        return False
    return True


def refusal(device: HostedDevice, reason: str, round_index: int = 0, step: int = 0) -> Message:
    """The error message a device answers a bad request with (counted, logged as a bounded sample)."""
    device.refused.add(reason)
    return Message("error", device.name, round_index, step, values={"reason": reason})


def serve_device(device: HostedDevice, session, codec: MessageCodec) -> bool:
    """Answer the server's requests; True when the server said stop, False when the connection ended."""
    while True:
        request_id = 0
        try:
            message, _, request_id = session.receive(timeout=None)
            if wants_stop(device, message, codec):
                return True
            reply = respond(device, message, codec)
        except ConnectionError as error:
            log.info("%s: connection ended: %s", device.name, error)
            return False
        except MessageError as error:  # a frame or payload that is not a message at all
            reply, request_id = refusal(device, str(error)[:500]), getattr(error, "id", 0)
        if reply is None:
            continue
        try:
            session.send(reply, reply_to=request_id)
        except ConnectionError as error:  # the server went away while we computed the reply
            log.info("%s: connection ended before the reply was sent: %s", device.name, error)
            return False

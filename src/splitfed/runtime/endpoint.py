"""A device process's side of the protocol: turn each request into a call on its stage worker.

Transport-agnostic: ``serve_device`` reads messages from any session with ``receive`` and
``send``. Compressed tensors are unpacked on arrival and replies packed with the run's
codecs (``wire.compression``), so the worker itself never sees codecs. A request that fails
is answered with an ``error`` message; the process keeps serving until the server says
``stop`` or the connection ends.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from splitfed.roles.worker import StageWorker
from splitfed.wire.compression import MessageCodec
from splitfed.wire.messages import Message, MessageError

log = logging.getLogger("splitfed.device")


CODEC_STATE = "codec/"
"""Prefix of the device's error-feedback residuals in its exported state."""


@dataclass
class HostedDevice:
    """A device's first-stage worker in this process, and the device index its codec streams use."""

    id: int
    worker: StageWorker
    trace: Path | None = None
    """Where to append one JSON line per request served (``runtime.trace_dir``), or None."""

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
              "role_state": "import_state"}
"""What a request of each data kind asks the worker to do (a ``call`` names its op itself)."""


def operation(message: Message) -> str:
    if message.kind == "call":
        return str(message.values.get("op"))
    return OPERATIONS.get(message.kind, message.kind)


def handle(device: HostedDevice, message: Message, codec: MessageCodec) -> Message:
    """The reply to one (unpacked) request."""
    r, s, name, worker = message.round, message.step, device.name, device.worker
    op = operation(message)
    if op == "forward":
        return worker.forward(None, r, s)
    if op == "backward":
        return worker.backward(None, message)
    if op == "apply":
        worker.apply(None, float(message.values["scale"]), float(message.values["lr"]))
        return Message("ack", name, r, s)
    if op == "local_step":
        loss, tokens = worker.local_step(None, float(message.values["lr"]))
        return Message("ack", name, r, s, values={"loss": loss, "tokens": tokens})
    if op == "upload":
        return worker.upload(None, r)
    if op == "download":
        worker.download(None, message)
        return Message("ack", name, r, s)
    if op == "export_state":
        tensors, meta = worker.export_state()
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


def is_stop(message: Message) -> bool:
    return message.kind == "call" and message.values.get("op") == "stop"


def respond(device: HostedDevice, message: Message, codec: MessageCodec) -> Message | None:
    """The packed reply to a request (an ``error`` message if it fails), or None if none is due."""
    if is_stop(message):
        return None
    if message.kind == "error":  # the server refused our last reply; it expects nothing back
        log.warning("%s: server refused our message: %s", device.name, message.values.get("reason"))
        return None
    try:
        started = time.time()
        reply = handle(device, codec.unpack(device.id, message), codec)
        device.record(operation(message), message, started, time.time())
        return codec.pack("up", device.id, reply)
    except (MessageError, KeyError, ValueError, RuntimeError) as error:
        log.warning("%s: request %s failed: %s", device.name, message.kind, error)
        return Message("error", device.name, message.round, message.step, values={"reason": str(error)})


def serve_device(device: HostedDevice, session, codec: MessageCodec) -> bool:
    """Answer the server's requests; True when the server said stop, False when the connection ended."""
    while True:
        try:
            message, _ = session.receive(timeout=None)
        except ConnectionError as error:
            log.info("%s: connection ended: %s", device.name, error)
            return False
        except MessageError as error:
            log.warning("%s: bad message from the server: %s", device.name, error)
            continue
        if is_stop(message):
            return True
        reply = respond(device, message, codec)
        if reply is None:
            continue
        try:
            session.send(reply)
        except ConnectionError as error:  # the server went away while we computed the reply
            log.info("%s: connection ended before the reply was sent: %s", device.name, error)
            return False

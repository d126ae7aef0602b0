"""A device process's side of the protocol: turn each request into a call on the local Device.

Transport-agnostic: ``serve_device`` reads messages from any session with ``receive`` and
``send``. Compressed tensors are unpacked on arrival and replies packed with the run's
codecs (``wire.compression``), so the Device itself never sees codecs. A request that fails
is answered with an ``error`` message; the process keeps serving until the server says
``stop`` or the connection ends.
"""

from __future__ import annotations

import json
import logging

from splitfed.roles.device import Device
from splitfed.wire.compression import MessageCodec
from splitfed.wire.messages import Message, MessageError

log = logging.getLogger("splitfed.device")


CODEC_STATE = "codec/"
"""Prefix of the device's error-feedback residuals in its exported state."""


def handle(device: Device, message: Message, codec: MessageCodec) -> Message:
    """The reply to one (unpacked) request."""
    r, s, name = message.round, message.step, device.name
    op = message.values.get("op") if message.kind == "call" else message.kind
    if op == "forward":
        return device.forward(r, s)
    if op == "activation_grad":
        return device.backward(message)
    if op == "clip_scale":
        device.apply(message, float(message.values["lr"]))
        return Message("ack", name, r, s)
    if op == "local_step":
        loss, tokens = device.local_step(float(message.values["lr"]))
        return Message("ack", name, r, s, values={"loss": loss, "tokens": tokens})
    if op == "upload":
        return device.upload(r)
    if op == "adapter_download":
        device.download(message)
        return Message("ack", name, r, s)
    if op == "export_state":
        tensors, meta = device.export_state()
        tensors.update({CODEC_STATE + k: v for k, v in codec.export_state(device.id).items()})
        return Message("role_state", name, r, s, tensors, {"meta": json.dumps(meta)})
    if op == "role_state":
        own = {k: v for k, v in message.tensors.items() if not k.startswith(CODEC_STATE)}
        device.import_state(own, json.loads(str(message.values["meta"])))
        codec.import_state({k[len(CODEC_STATE):]: v for k, v in message.tensors.items() if k.startswith(CODEC_STATE)})
        return Message("ack", name, r, s)
    if op == "report":
        return Message("ack", name, r, s, values={"peak_bytes": device.peak_bytes(), "trainable_params": device.trainable_params})
    raise MessageError(f"unknown request {op!r}")


def is_stop(message: Message) -> bool:
    return message.kind == "call" and message.values.get("op") == "stop"


def respond(device: Device, message: Message, codec: MessageCodec) -> Message | None:
    """The packed reply to a request (an ``error`` message if it fails), or None if none is due."""
    if is_stop(message):
        return None
    if message.kind == "error":  # the server refused our last reply; it expects nothing back
        log.warning("%s: server refused our message: %s", device.name, message.values.get("reason"))
        return None
    try:
        return codec.pack("up", device.id, handle(device, codec.unpack(device.id, message), codec))
    except (MessageError, KeyError, ValueError, RuntimeError) as error:
        log.warning("%s: request %s failed: %s", device.name, message.kind, error)
        return Message("error", device.name, message.round, message.step, values={"reason": str(error)})


def serve_device(device: Device, session, codec: MessageCodec) -> bool:
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

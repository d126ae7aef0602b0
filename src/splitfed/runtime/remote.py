"""Server-side handles of devices that live elsewhere: the same interface as a local Device.

A protocol calls ``device.forward(...)``, ``device.backward(...)`` ... exactly as in-process;
a RemoteDevice turns each call into a request over a ``Transport`` (gRPC streams, Ray
actors), waits for the reply (with a deadline), checks it (``wire.validate``) and counts
its bytes. A reply that fails the checks is answered with an ``error`` message and raises
DeviceDropped: the protocol drops that device from the round and serves the others.
"""

from __future__ import annotations

import json
import logging

import torch

from typing import Protocol

from splitfed.config import RunConfig
from splitfed.models.loading import load_model_config
from splitfed.models.split import StageSpec
from splitfed.runtime.link import Link, message_codec
from splitfed.wire.compression import MessageCodec
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


class RemoteLink(Link):
    """The server's side of links to remote devices: the handles exchange (and count) messages
    themselves, so ``up`` / ``down`` pass messages through."""

    def up(self, device: int, message: Message) -> Message:
        return message

    def down(self, device: int, message: Message) -> Message:
        return message


class RemoteDevice:
    def __init__(
        self,
        device_id: int,
        spec: StageSpec,
        transport: Transport,
        link: RemoteLink,
        *,
        hidden_size: int,
        vocab_size: int,
        seq_len: int,
        max_batch: int,
        timeout_s: float,
    ) -> None:
        self.id = device_id
        self.spec = spec
        self.transport = transport
        self.link = link
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.seq_len, self.max_batch = seq_len, max_batch
        self.timeout_s = timeout_s
        self.last_loss, self.last_tokens = float("nan"), 0
        self._adapter_shapes: dict[str, tuple[int | None, ...]] | None = None
        self._report: dict | None = None

    @property
    def layers(self) -> range:
        return self.spec.layers

    # --- transport ------------------------------------------------------------------------
    def _exchange(self, message: Message, expected: Expectation) -> Message:
        """Send a request (packed by the codec), wait for the reply, count both, unpack and check it."""
        codec = self.link.codec
        packed = codec.pack("down", self.id, message)
        try:
            reply, sent, received = self.transport.request(self.id, packed, self.timeout_s)
        except DeviceLost as error:
            raise DeviceDropped(self.id, str(error)) from None
        except MessageError as error:
            self._refuse(message, str(error))
        self.link.record(self.id, down=sent, kind=message.kind)
        self.link.record(self.id, up=received, kind=expected.kind)
        codec.tally(packed, sent)
        try:
            dense = codec.unpack(self.id, reply) if reply.kind == expected.kind else reply
            checked = validate(dense, expected)
        except MessageError as error:
            self._refuse(message, str(error))
        codec.tally(reply, received)
        return checked

    def _call(self, op: str, round_index: int = 0, step: int = 0, **values: float) -> Message:
        return Message("call", "server", round_index, step, values={"op": op, **values})

    # --- the Device interface ---------------------------------------------------------------
    def forward(self, round_index: int, step: int) -> Message:
        seq, batch_axis = self.seq_len, None
        expected = Expectation("activations", round_index, step, {
            "hidden": TensorSpec((batch_axis, seq, self.hidden_size), torch.float32, finite=True),
            "attention_mask": TensorSpec((batch_axis, seq), torch.int64, value_range=(0, 2)),
            "labels": TensorSpec((batch_axis, seq), torch.int64, value_range=(0, self.vocab_size), extra_values=(-100,)),
        })
        reply = self._exchange(self._call("forward", round_index, step), expected)
        sizes = {t.shape[0] for t in reply.tensors.values()}
        if len(sizes) != 1 or sizes.pop() > self.max_batch:
            self._refuse(reply, f"batch sizes {sorted({t.shape[0] for t in reply.tensors.values()})} "
                                f"differ or exceed train.batch_size={self.max_batch}")
        return reply

    def backward(self, message: Message) -> Message:
        self.last_loss, self.last_tokens = float(message.values["loss"]), int(message.values["tokens"])
        expected = Expectation("grad_norm", message.round, message.step, finite_values=("sq_norm",))
        reply = self._exchange(message, expected)
        if reply.values["sq_norm"] < 0:
            self._refuse(reply, "sq_norm is negative")
        return reply

    def apply(self, message: Message, lr: float) -> None:
        message.values["lr"] = lr
        self._exchange(message, Expectation("ack", message.round, message.step))

    def local_step(self, lr: float) -> tuple[float, int]:
        reply = self._exchange(self._call("local_step", lr=lr), Expectation("ack", 0, 0, finite_values=("loss", "tokens")))
        return float(reply.values["loss"]), int(reply.values["tokens"])

    def upload(self, round_index: int) -> Message:
        shapes = self._adapter_shapes or {}
        expected = Expectation(
            "adapter_upload", round_index, 0,
            {k: TensorSpec(s, torch.float32, finite=True) for k, s in shapes.items()},
            exact_tensors=bool(shapes), finite_values=("num_samples",),
        )
        return self._exchange(self._call("upload", round_index), expected)

    def download(self, message: Message) -> None:
        if self._adapter_shapes is None:  # the first download fixes the adapter's layout; ranks may differ
            self._adapter_shapes = {
                k: (None, v.shape[1]) if ".lora_A." in k else (v.shape[0], None) for k, v in message.tensors.items()
            }
        self._exchange(message, Expectation("ack", message.round, message.step))

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        reply = self._exchange(self._call("export_state"), Expectation("role_state", 0, 0, exact_tensors=False))
        return reply.tensors, json.loads(reply.values["meta"])

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        message = Message("role_state", "server", 0, 0, tensors, {"meta": json.dumps(meta)})
        self._exchange(message, Expectation("ack", 0, 0))

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
                self._report = self._exchange(self._call("report"), expected).values
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
    """Creates the handles a protocol uses in place of local devices, and stops them at the end."""

    def __init__(self, transport: Transport, codec: MessageCodec, *, hidden_size: int, vocab_size: int, seq_len: int,
                 max_batch: int, timeout_s: float) -> None:
        self.transport = transport
        self.link = RemoteLink(codec)
        self.handles: dict[int, RemoteDevice] = {}
        self._limits = dict(hidden_size=hidden_size, vocab_size=vocab_size, seq_len=seq_len, max_batch=max_batch,
                            timeout_s=timeout_s)

    def device(self, device_id: int, spec: StageSpec) -> RemoteDevice:
        handle = RemoteDevice(device_id, spec, self.transport, self.link, **self._limits)
        self.handles[device_id] = handle
        return handle

    def stop_all(self) -> None:
        for handle in self.handles.values():
            handle.stop()


def remote_devices(config: RunConfig, transport: Transport) -> RemoteDevices:
    """Handles for the devices of ``config`` reached over ``transport``, with the run's codecs and limits."""
    model_config = load_model_config(config.model.source)
    return RemoteDevices(
        transport, message_codec(config), hidden_size=int(model_config.hidden_size),
        vocab_size=int(model_config.vocab_size), seq_len=config.train.seq_len, max_batch=config.train.batch_size,
        timeout_s=config.runtime.request_timeout_s,
    )

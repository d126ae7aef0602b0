"""Message compression on the wire: both ends of a link in separate codecs agree with the
in-process link, per-device pipelines apply, corrupt messages raise clear errors and
error-feedback residuals survive a checkpoint round trip."""

from __future__ import annotations

import json

import pytest
import torch

from splitfed.config import parse_config
from splitfed.runtime.inproc import InProcessLink
from splitfed.topology import Hop
from splitfed.wire.codecs import CodecError
from splitfed.wire.compression import MessageCodec
from splitfed.wire.messages import Message, decode, encode

SPEC = "topk:0.2 > quant:4 > zstd"


def _compression(**fields):
    return parse_config({"devices": {"count": 2, "cuts": [1]}, "compression": fields}).compression


def _activations(seed: int, device: int = 0, step: int = 0) -> Message:
    hidden = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(seed))
    tensors = {"hidden": hidden, "attention_mask": torch.ones(4, 16, dtype=torch.long),
               "labels": torch.zeros(4, 16, dtype=torch.long)}
    return Message("activations", f"device{device}", 0, step, tensors)


def _over_the_wire(sender: MessageCodec, receiver: MessageCodec, device: int, message: Message) -> Message:
    """What a device process sends and a server process receives: two codecs, bytes between them."""
    return receiver.unpack(device, decode(encode(sender.pack("up", device, message))))


def test_two_process_ends_deliver_what_the_in_process_link_delivers():
    compression = _compression(activations=SPEC, error_feedback=True)
    link = InProcessLink(MessageCodec(compression, seed=7))
    device_side, server_side = MessageCodec(compression, seed=7), MessageCodec(compression, seed=7)
    for step in range(3):  # error feedback: later messages depend on the residual of earlier ones
        message = _activations(step, step=step)
        local = link.carry(Hop("device0", "server"), 0, "up", message, coded=True)
        remote = _over_the_wire(device_side, server_side, 0, message)
        assert remote.values == local.values == {}
        assert remote.tensors.keys() == message.tensors.keys()
        torch.testing.assert_close(remote.tensors["hidden"], local.tensors["hidden"], atol=0, rtol=0)


def test_per_device_pipelines_and_statistics():
    codec = MessageCodec(_compression(activations_per_device=["fp16", "none"]), seed=0)
    sizes = {}
    for device in (0, 1):
        packed = codec.pack("up", device, _activations(0, device))
        sizes[device] = len(encode(packed))
        codec.tally(packed, sizes[device])
        assert ("hidden#codec" in packed.values) == (device == 0)
    assert sizes[0] < 0.6 * sizes[1]
    stats = codec.take_stats()
    assert stats["activations_bytes"] == sizes[0] + sizes[1]
    assert stats["activations_fp32_bytes"] == 2 * 4 * 16 * 64 * 4
    assert 0 < stats["activations_rel_error"] < 1e-3 / 2  # fp16 on one message, exact on the other
    assert codec.take_stats()["activations_bytes"] == 0  # taken and reset


def test_sender_reports_the_true_relative_error():
    codec = MessageCodec(_compression(activations=SPEC), seed=0)
    message = _activations(3)
    packed = codec.pack("up", 0, message)
    decoded = codec.unpack(0, decode(encode(packed))).tensors["hidden"]
    sent = message.tensors["hidden"]
    assert packed.values["hidden#error"] == pytest.approx(float((decoded - sent).norm() / sent.norm()), rel=1e-5)


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda v: v.update({"hidden#codec": json.dumps({**json.loads(v["hidden#codec"]), "spec": "fp16"})}),
         "encoded with 'fp16'"),
        (lambda v: v.pop("hidden#codec"), "arrived without codec metadata"),
        (lambda v: v.update({"hidden#codec": "{not json"}), "codec metadata of 'hidden' is not JSON"),
    ],
)
def test_corrupt_compressed_messages_raise_clear_errors(corrupt, expected):
    codec = MessageCodec(_compression(activations=SPEC), seed=0)
    packed = codec.pack("up", 0, _activations(0))
    corrupt(packed.values)
    with pytest.raises(CodecError, match=expected):
        codec.unpack(0, decode(encode(packed)))


def test_error_feedback_residuals_survive_export_and_import():
    compression = _compression(activations=SPEC, error_feedback=True)
    original, restored = MessageCodec(compression, seed=1), MessageCodec(compression, seed=1)
    for device in (0, 1):
        original.pack("up", device, _activations(device, device))
    state = original.export_state()
    assert len(state) == 2 and len(original.export_state(device=1)) == 1
    restored.import_state({k: v.clone() for k, v in state.items()})
    after = _activations(5, 1, step=1)
    packed = {name: encode(codec.pack("up", 1, after))
              for name, codec in [("original", original), ("restored", restored), ("fresh", MessageCodec(compression, seed=1))]}
    assert packed["restored"] == packed["original"]
    assert packed["fresh"] != packed["original"]  # the residual matters

"""Messages round-trip exactly through their byte encoding, and bad payloads are rejected clearly."""

from __future__ import annotations

import pytest
import torch

from splitfed.wire.messages import Message, MessageError, decode, encode


def _activation_message() -> Message:
    tensors = {
        "hidden": torch.randn(2, 5, 8),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.randint(0, 10, (2, 5)),
    }
    return Message("activations", "device3", round=2, step=1, tensors=tensors, values={"note": "x"})


def test_round_trip_is_exact_and_counts_every_tensor_byte():
    message = _activation_message()
    data = encode(message)
    decoded = decode(data)
    assert (decoded.kind, decoded.sender, decoded.round, decoded.step, decoded.values) == (
        "activations", "device3", 2, 1, {"note": "x"})
    for name, tensor in message.tensors.items():
        assert torch.equal(decoded.tensors[name], tensor) and decoded.tensors[name].dtype == tensor.dtype
    payload = sum(t.numel() * t.element_size() for t in message.tensors.values())
    assert payload < len(data) < payload + 1024  # real bytes: payload plus a small header


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d[:4], "shorter than the 8-byte header"),
        (lambda d: d[:40], "exceeds the payload"),
        (lambda d: d[:-7], "corrupt"),
        (lambda d: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "not a splitfed message header"),
    ],
)
def test_corrupt_payloads_raise_clear_errors(mutate, expected):
    with pytest.raises(MessageError, match=expected):
        decode(mutate(encode(_activation_message())))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (Message("gossip", "d", 0, 0), "unknown message kind 'gossip'"),
        (Message("clip_scale", "d", -1, 0, values={"scale": 1.0}), "invalid round"),
        (Message("clip_scale", "d", 0, 2**31, values={"scale": 1.0}), "invalid step"),
        (Message("ack", "d" * 300, 0, 0), "sender"),
        (Message("ack", "d", 0, 0, values={"flag": True}), "is a bool"),
    ],
)
def test_invalid_messages_name_the_problem(message, expected):
    with pytest.raises(MessageError, match=expected):
        decode(encode(message))

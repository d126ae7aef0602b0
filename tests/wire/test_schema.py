"""Every message kind has a schema; messages outside it are refused with a short error naming the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save as save_tensors

from splitfed.wire.messages import KINDS, Message, MessageError, decode, encode
from splitfed.wire.schema import SCHEMAS, Bounds, check, check_reply
from tests.wire.fuzz import generate, valid_message

ADAPTER = {"layers.0.q_proj.lora_A.weight": (4, 16), "layers.0.q_proj.lora_B.weight": (16, 4)}
BOUNDS = Bounds(hidden_size=16, vocab_size=50, seq_len=8, max_batch=4, adapter=ADAPTER,
                merge_modules={"layers.0.q_proj": (12, 16)}, max_merge_rank=8)


def _decode_and_check(payload: bytes, bounds: Bounds = BOUNDS) -> Message:
    return check(decode(payload), bounds)


@pytest.mark.parametrize("kind", KINDS)
def test_valid_message_of_every_kind_passes(kind):
    message = valid_message(kind, BOUNDS)
    assert _decode_and_check(encode(message)).kind == kind


def test_every_generated_bad_message_is_refused_with_a_short_reason():
    """The fuzz generator's payloads all break the schema: a receiver that accepted one would have a hole."""
    for description, payload in generate(3000, BOUNDS, seed=0):
        with pytest.raises(MessageError) as refused:
            _decode_and_check(payload)
        assert len(str(refused.value)) < 400, (description, str(refused.value)[:200])


def _upload(tensors: dict[str, torch.Tensor], **values) -> Message:
    return Message("adapter_upload", "device0", 1, 0, tensors, {"num_samples": 3, **values})


def _scores(tensors: dict[str, torch.Tensor]) -> Message:
    return Message("importance", "device0", 1, 0, tensors)


def _merge(tensors: dict[str, torch.Tensor], since: int = 0) -> Message:
    return Message("adapter_merge", "aggregator", 1, 0, tensors, {"since": since, "version": 1})


RANK_4 = {k: torch.zeros(s) for k, s in ADAPTER.items()}
RANK_64 = {"layers.0.q_proj.lora_A.weight": torch.zeros(64, 16), "layers.0.q_proj.lora_B.weight": torch.zeros(16, 64)}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (_upload(RANK_4, num_samples=-5), r"num_samples=-5 is not a finite number in \[1"),
        (_upload(RANK_4, num_samples=0), "num_samples=0"),
        (_upload(RANK_64), r"has shape \(64, 16\), expected \(4, 16\)"),
        (_upload({**RANK_4, "extra": torch.zeros(1)}), "unexpected tensors"),
        (Message("clip_scale", "server", 0, 0, values={"scale": 1.5}), r"scale=1.5 is not a finite number in \[0, 1\]"),
        (Message("clip_scale", "server", 0, 0, values={"scale": math.nan}), "scale=nan"),
        (Message("call", "server", 0, 0, values={"op": "rm -rf"}), "allowed: forward"),
        (Message("call", "server", 0, 0, values={"op": "forward", "lr": -1.0}), "lr=-1.0"),
        (Message("role_state", "device0", 0, 0, values={"meta": "{not json"}), "meta is not JSON"),
        (Message("role_state", "device0", 0, 0, values={"meta": "5"}), "JSON int, not an object"),
        (Message("grad_norm", "device0", 0, 0, values={"sq_norm": -1.0}), "sq_norm=-1.0"),
        (Message("ack", "device0", 0, 0, values={"loss": "low"}), "loss='low'"),
        (Message("activation_grad", "server", 0, 0, {"grad": torch.zeros(2, 8, 16)},
                 {"loss": 1.0, "tokens": 3}), r"missing values \['grad_scale'\]"),
        (_merge({"0/layers.0.q_proj.lora_A.weight": torch.zeros(2, 16)}), "needs lora_A and lora_B of one rank"),
        (_merge({"0/layers.0.q_proj.lora_A.weight": torch.zeros(2, 16),
                 "0/layers.0.q_proj.lora_B.weight": torch.zeros(12, 3)}), "needs lora_A and lora_B of one rank"),
        (_merge({"0/layers.0.q_proj.lora_A.weight": torch.zeros(9, 16),
                 "0/layers.0.q_proj.lora_B.weight": torch.zeros(12, 9)}), r"with 1 <= R <= 8"),
        (_merge({"0/layers.0.k_proj.lora_A.weight": torch.zeros(2, 16)}), "not a module of the receiver's layers"),
        (_merge({"3/layers.0.q_proj.lora_A.weight": torch.zeros(2, 16)}), r"is merge 3; the message brings 0..0"),
        (_merge({"0/layers.0.q_proj.lora_A.weight": torch.zeros(2, 12)}), r"expected \(R, 16\)"),
        (_merge({"x": torch.zeros(2, 12)}), "is not named '<version>/<module>.lora_A.weight'"),
        (_merge({}, since=2), "since=2 must be below version=1"),
        (_scores({"layers.0.k_proj": torch.tensor([1.0], dtype=torch.float64)}), r"no score for \['layers.0.q_proj'\]"),
        (_scores({"layers.0.q_proj": torch.tensor([1.0], dtype=torch.float64),
                  "layers.0.k_proj": torch.tensor([1.0], dtype=torch.float64)}), "not a weight matrix of the sender"),
        (_scores({"layers.0.q_proj": torch.tensor([1.0])}), r"must be float64 of shape \(1,\)"),
        (_scores({"layers.0.q_proj": torch.tensor([-1.0], dtype=torch.float64)}), "must be a finite score >= 0"),
        (Message("call", "server", 0, 0, values={"op": "relayout", "placement": "[1, 2]"}), "JSON list, not an object"),
    ],
)
def test_schema_violations_name_the_field(message, expected):
    with pytest.raises(MessageError, match=expected):
        _decode_and_check(encode(message))


def test_adapter_tensors_need_a_known_layout():
    with pytest.raises(MessageError, match="before the adapter's layout is known"):
        check(_upload(RANK_4), Bounds(16, 50, 8, 4))


def test_batch_must_match_the_pending_forward():
    message = Message("activation_grad", "server", 0, 0, {"grad": torch.zeros(3, 8, 16)},
                      {"loss": 1.0, "tokens": 3, "grad_scale": 1.0})
    check(message, BOUNDS)
    with pytest.raises(MessageError, match="batch size 3, expected 2"):
        check(message, Bounds(16, 50, 8, 4, batch=2))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"kind": "ack", "sender": "d", "round": 0, "step": 0, "values": 5}, "values is a int"),
        ({"kind": ["ack"], "sender": "d", "round": 0, "step": 0}, r"unknown message kind \['ack'\]"),
        ([{"kind": "ack"}], "header is a list"),
        ({"kind": "ack", "sender": "d", "round": 0, "step": 0, "admin": 1}, "unknown fields"),
        ({"kind": "ack", "sender": "d", "round": 0, "step": 0, "values": {"x": [1]}}, "is a list"),
        ({"kind": "a" * 900_000, "sender": "d", "round": 0, "step": 0}, "unknown message kind"),
    ],
)
def test_malformed_headers_are_refused_briefly(header, expected):
    with pytest.raises(MessageError, match=expected) as refused:
        decode(save_tensors({}, metadata={"splitfed": json.dumps(header)}))
    assert len(str(refused.value)) < 300


def test_deeply_nested_header_is_refused():
    with pytest.raises(MessageError, match="not a splitfed message header"):
        decode(save_tensors({}, metadata={"splitfed": "[" * 200_000 + "]" * 200_000}))


def test_reply_must_come_from_its_streams_identity():
    reply = Message("grad_norm", "device1", 0, 3, values={"sq_norm": 1.0})
    assert check_reply(reply, BOUNDS, kind="grad_norm", round_index=0, step=3, sender="device1") is reply
    with pytest.raises(MessageError, match="sender must be 'device0'"):
        check_reply(reply, BOUNDS, kind="grad_norm", round_index=0, step=3, sender="device0")
    with pytest.raises(MessageError, match="round/step 0/3, expected 0/4"):
        check_reply(reply, BOUNDS, kind="grad_norm", round_index=0, step=4, sender="device1")
    with pytest.raises(MessageError, match="expected a ack message"):
        check_reply(reply, BOUNDS, kind="ack", round_index=0, step=3, sender="device1")


def test_every_kind_has_a_schema():
    assert set(SCHEMAS) == set(KINDS)

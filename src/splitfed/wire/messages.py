"""Typed messages between roles and their byte encoding (safetensors: no pickle).

Everything that crosses a role boundary is a ``Message``: a kind, the sender, round and
step numbers, named tensors and a few scalar values. ``encode`` produces the exact bytes
that would go on a network (a safetensors blob whose metadata carries the header), and
in-process runs encode every message too, so byte counts are the real ones.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

Scalar = int | float | str


class MessageError(ValueError):
    """A payload that is not a valid message; the text says what is wrong."""


# kind -> (required tensor names, required value names)
SCHEMAS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # stage k -> stage k + 1: output of stage k plus what the last stage needs for the loss
    "activations": (frozenset({"hidden", "attention_mask", "labels"}), frozenset()),
    # stage k + 1 -> stage k: gradient of the group's mean loss w.r.t. the hidden states, the
    # route's loss and tokens, and grad_scale = group tokens / route tokens (the first stage
    # multiplies by it, so it steps on its own mean loss)
    "activation_grad": (frozenset({"grad"}), frozenset({"loss", "tokens", "grad_scale"})),
    # first stage -> server: its squared grad norm (for clipping over the whole route)
    "grad_norm": (frozenset(), frozenset({"sq_norm"})),
    # server -> every stage: factor to multiply the gradients by before the optimizer step
    "clip_scale": (frozenset(), frozenset({"scale"})),
    # device -> aggregator: local adapter after the round, with its sample weight
    "adapter_upload": (frozenset(), frozenset({"num_samples"})),
    # aggregator -> device: global adapter slice for the next round
    "adapter_download": (frozenset(), frozenset()),
    # server -> device process: run an operation that carries no data of its own
    "call": (frozenset(), frozenset({"op"})),
    # device process -> server: an operation finished (values may carry its result)
    "ack": (frozenset(), frozenset()),
    # either way: the message just received was refused, and why
    "error": (frozenset(), frozenset({"reason"})),
    # device process <-> server: a role's adapter, optimizer and data-stream state (checkpoints)
    "role_state": (frozenset(), frozenset({"meta"})),
}


@dataclass
class Message:
    kind: str
    sender: str
    round: int
    step: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, Scalar] = field(default_factory=dict)


def encode(message: Message) -> bytes:
    header = {
        "kind": message.kind,
        "sender": message.sender,
        "round": message.round,
        "step": message.step,
        "values": message.values,
    }
    tensors = {name: t.detach().contiguous() for name, t in message.tensors.items()}
    return save_tensors(tensors, metadata={"splitfed": json.dumps(header)})


def _read_metadata(data: bytes) -> dict:
    if len(data) < 8:
        raise MessageError(f"payload of {len(data)} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise MessageError(f"header length {header_len} exceeds the payload ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        return json.loads(header["__metadata__"]["splitfed"])
    except (ValueError, KeyError, TypeError) as error:
        raise MessageError(f"payload header is not a splitfed message header: {error}") from None


def decode(data: bytes) -> Message:
    """Parse and validate a payload; raise MessageError naming what is wrong."""
    meta = _read_metadata(data)
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors raises its own error types for corrupt data
        raise MessageError(f"tensor section is corrupt: {error}") from None
    kind = meta.get("kind")
    if kind not in SCHEMAS:
        raise MessageError(f"unknown message kind {kind!r}; allowed: {', '.join(SCHEMAS)}")
    need_tensors, need_values = SCHEMAS[kind]
    values = meta.get("values", {})
    if not need_tensors <= tensors.keys():
        raise MessageError(f"{kind} message lacks tensors {sorted(need_tensors - tensors.keys())}")
    if not need_values <= values.keys():
        raise MessageError(f"{kind} message lacks values {sorted(need_values - values.keys())}")
    for name in ("round", "step"):
        if not isinstance(meta.get(name), int) or meta[name] < 0:
            raise MessageError(f"{kind} message has invalid {name} {meta.get(name)!r}")
    return Message(kind, str(meta.get("sender", "")), meta["round"], meta["step"], tensors, values)

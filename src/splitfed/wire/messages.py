"""Typed messages between roles and their byte encoding (safetensors: no pickle).

Everything that crosses a role boundary is a ``Message``: a kind, the sender, round and
step numbers, named tensors and a few scalar values. ``encode`` produces the exact bytes
that would go on a network (a safetensors blob whose metadata carries the header), and
in-process runs encode every message too, so byte counts are the real ones.

``decode`` checks the header's structure (types and sizes of every field) so nothing a
peer sends can raise anything but ``MessageError``; what each kind's values and tensors
may be is checked next, by ``wire.schema``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

Scalar = int | float | str

KINDS = ("activations", "activation_grad", "grad_norm", "clip_scale", "adapter_upload", "adapter_download",
         "adapter_merge", "importance", "call", "ack", "error", "role_state", "held", "group_grad")
"""Every message kind; ``wire.schema.SCHEMAS`` says what each one carries."""

MAX_HEADER_BYTES = 64 << 20
"""Largest safetensors header (tensor table + our JSON) a payload may declare."""
MAX_NAME_CHARS = 256
"""Longest sender, value name or tensor name."""
MAX_INDEX = 1 << 31
"""Round and step numbers are below this."""


class MessageError(ValueError):
    """A payload that is not a valid message; the text says what is wrong."""


def shown(value: object, limit: int = 60) -> str:
    """``value`` for an error text: repr-escaped (no control characters) and cut to ``limit`` characters.

    Every piece of peer-supplied text in an error goes through here, so a refusal is short
    whatever the peer sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


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
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in message.tensors.items()}  # from any device
    return save_tensors(tensors, metadata={"splitfed": json.dumps(header)})


def _read_header(data: bytes) -> dict:
    if len(data) < 8:
        raise MessageError(f"payload of {len(data)} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        raise MessageError(f"header length {header_len} exceeds the payload ({len(data)} bytes) or "
                           f"{MAX_HEADER_BYTES} bytes")
    try:
        table = json.loads(data[8 : 8 + header_len])
        header = json.loads(table["__metadata__"]["splitfed"])
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise MessageError(f"payload header is not a splitfed message header: {shown(str(error))}") from None
    if not isinstance(header, dict):
        raise MessageError(f"message header is a {type(header).__name__}, not an object")
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(header: dict) -> None:
    """Types and sizes of the header fields; anything else in the header is refused."""
    unknown = header.keys() - {"kind", "sender", "round", "step", "values"}
    if unknown:
        raise MessageError(f"message header has unknown fields {shown(sorted(unknown))}")
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise MessageError(f"unknown message kind {shown(kind)}; allowed: {', '.join(KINDS)}")
    sender = header.get("sender")
    if not isinstance(sender, str) or len(sender) > MAX_NAME_CHARS:
        raise MessageError(f"{kind} message: sender {shown(sender)} is not a name of at most {MAX_NAME_CHARS} chars")
    for name in ("round", "step"):
        value = header.get(name)
        if not _is_int(value) or not 0 <= value < MAX_INDEX:
            raise MessageError(f"{kind} message has invalid {name} {shown(value)}; allowed: 0..{MAX_INDEX - 1}")
    values = header.get("values", {})
    if not isinstance(values, dict):
        raise MessageError(f"{kind} message: values is a {type(values).__name__}, not an object")
    for name, value in values.items():
        if len(name) > MAX_NAME_CHARS:
            raise MessageError(f"{kind} message: value name {shown(name)} is longer than {MAX_NAME_CHARS} chars")
        if not isinstance(value, (int, float, str)) or isinstance(value, bool):
            raise MessageError(f"{kind} message: value {shown(name)} is a {type(value).__name__}; "
                               "allowed: a number or a string")


def decode(data: bytes) -> Message:
    """Parse a payload and check its header's structure; raise MessageError naming what is wrong."""
    header = _read_header(data)
    _check_header(header)
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors raises its own error types for corrupt data
        raise MessageError(f"tensor section is corrupt: {shown(str(error))}") from None
    kind = header["kind"]
    for name in tensors:
        if len(name) > MAX_NAME_CHARS:
            raise MessageError(f"{kind} message: tensor name {shown(name)} is longer than {MAX_NAME_CHARS} chars")
    return Message(kind, header["sender"], header["round"], header["step"], tensors, header.get("values", {}))

"""Check a decoded message against what the receiver expects before using it.

Decoding (``wire.messages.decode``) guarantees a well-formed message. This module checks it
is the *right* one: kind, round and step; every tensor's presence, shape, dtype and finite
values; ids within the vocabulary. A message from another process passes here first; a
failure raises MessageError naming the field, and the receiver answers with an error
instead of crashing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from splitfed.wire.messages import Message, MessageError


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int | None, ...]
    """Expected shape; None matches any size (at least 1) on that axis."""
    dtype: torch.dtype
    finite: bool = False
    value_range: tuple[int, int] | None = None
    """For integer tensors: allowed [low, high) besides ``extra_values``."""
    extra_values: tuple[int, ...] = ()


@dataclass(frozen=True)
class Expectation:
    kind: str
    round: int
    step: int
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    exact_tensors: bool = True
    """Refuse tensors not listed in ``tensors``."""
    finite_values: tuple[str, ...] = ()
    """Scalar values that must be finite numbers."""


def validate(message: Message, expected: Expectation) -> Message:
    where = f"{message.kind} message from {message.sender or 'peer'}"
    if message.kind == "error":
        raise MessageError(f"peer reported an error: {message.values.get('reason')}")
    if message.kind != expected.kind:
        raise MessageError(f"expected a {expected.kind} message, got {where}")
    if (message.round, message.step) != (expected.round, expected.step):
        raise MessageError(
            f"{where}: round/step {message.round}/{message.step}, expected {expected.round}/{expected.step}"
        )
    if expected.exact_tensors and message.tensors.keys() != expected.tensors.keys():
        extra = sorted(message.tensors.keys() - expected.tensors.keys())[:3]
        missing = sorted(expected.tensors.keys() - message.tensors.keys())[:3]
        raise MessageError(f"{where}: unexpected tensors {extra}, missing {missing}")
    for name, spec in expected.tensors.items():
        _check_tensor(where, name, message.tensors.get(name), spec)
    for name in expected.finite_values:
        value = message.values.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise MessageError(f"{where}: value {name}={value!r} is not a finite number")
    return message


def _check_tensor(where: str, name: str, tensor: torch.Tensor | None, spec: TensorSpec) -> None:
    if tensor is None:
        raise MessageError(f"{where}: missing tensor {name!r}")
    if tensor.dtype != spec.dtype:
        raise MessageError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected {spec.dtype}")
    if len(tensor.shape) != len(spec.shape) or any(
        (want is None and got < 1) or (want is not None and got != want) for got, want in zip(tensor.shape, spec.shape)
    ):
        shown = tuple("*" if s is None else s for s in spec.shape)
        raise MessageError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shown}")
    if spec.finite and not bool(torch.isfinite(tensor).all()):
        raise MessageError(f"{where}: tensor {name!r} has NaN or infinite values")
    if spec.value_range is not None:
        low, high = spec.value_range
        bad = (tensor < low) | (tensor >= high)
        for allowed in spec.extra_values:
            bad &= tensor != allowed
        if bool(bad.any()):
            raise MessageError(f"{where}: tensor {name!r} has values outside [{low}, {high})")

"""Merging aggregated LoRA into the frozen base weights (FLoRA / HSplitLoRA's ``stack`` redistribution).

The ``stack`` strategy (``adapters.aggregate``) combines heterogeneous adapters exactly but at the
summed rank, so the published scheme does not keep the result as an adapter: each round's
aggregate becomes a *merge*, one pair (A, B) per module with delta = B @ A (the LoRA scaling is
folded into A), that every role adds to the frozen weights of the layers it holds; the adapters
then restart (A fresh, B = 0), which leaves the model's function unchanged.

Merges are numbered (version k = the k-th aggregate, from 0). A message carries the merges a role
has not applied yet, keyed ``"<k>/<module>.lora_A.weight"``. A base model records per layer how
many merges it holds, so a base shared by several roles of one process (the in-process
simulation) takes each merge once, and a role that missed rounds catches up exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from splitfed.adapters.aggregate import A_SUFFIX, B_SUFFIX
from splitfed.adapters.importance import base_linear
from splitfed.adapters.lora import AdapterState, layer_of, lora_layers, target_modules
from splitfed.models.families import Family

_VERSIONS = "_splitfed_merges"
"""Attribute of a base model: decoder layer -> number of merges its weights hold."""


def module_deltas(state: AdapterState, scaling: float) -> dict[str, torch.Tensor]:
    """Module path -> scaling x B @ A, (out, in), for every module of an adapter state (or of merge factors, scaling 1)."""
    return {key[: -len(A_SUFFIX)]: scaling * (state[key[: -len(A_SUFFIX)] + B_SUFFIX] @ tensor)
            for key, tensor in state.items() if key.endswith(A_SUFFIX)}


def merge_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], fan_in_fan_out: bool = False) -> None:
    """Add each (out, in) delta to the frozen weight of the module at its path (GPT-2's Conv1D stores (in, out))."""
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = base_linear(model.get_submodule(path)).weight
            weight += (delta.T if fan_in_fan_out else delta).to(weight.device, weight.dtype)


def restart_adapter(model: nn.Module, name: str) -> None:
    """Re-initialise adapter ``name`` as PEFT does (A random, B = 0): its product, and so its effect, is zero."""
    for layer in lora_layers(model):
        if name in layer.lora_A:
            layer.reset_lora_parameters(name, True)


def merge_key(version: int, key: str) -> str:
    return f"{version}/{key}"


def split_merge_key(name: str) -> tuple[int, str]:
    """(version, adapter key) of a merge tensor's name; ValueError if it is not one."""
    version, sep, key = name.partition("/")
    if not sep or not version.isdigit() or not key.endswith((A_SUFFIX, B_SUFFIX)):
        raise ValueError(f"{name!r} is not a merge tensor name ('<version>/<module>.lora_A.weight' or lora_B)")
    return int(version), key


def merged_versions(model: nn.Module) -> dict[int, int]:
    """Decoder layer -> number of merges the model's weights of that layer hold."""
    return dict(getattr(model, _VERSIONS, {}))


def apply_merges(model: nn.Module, merges: Mapping[str, torch.Tensor], family: Family, layers: Iterable[int],
                 since: int, version: int) -> list[int]:
    """Bring ``layers`` of ``model``'s base weights to ``version`` merges; returns the layers changed.

    ``merges`` holds versions ``since .. version - 1`` (keys of ``merge_key``). A layer already at
    ``version`` is left alone (a role of this process sharing the base merged it); a layer below
    ``since`` cannot be brought up from this message: ValueError."""
    stamps: dict[int, int] = getattr(model, _VERSIONS, {})
    by_version: dict[tuple[int, int], AdapterState] = {}
    for name, tensor in merges.items():
        k, key = split_merge_key(name)
        by_version.setdefault((k, layer_of(key, family)), {})[key] = tensor
    changed = []
    for layer in layers:
        at = stamps.get(layer, 0)
        if at >= version:
            continue
        if at < since:
            raise ValueError(f"layer {layer} holds {at} merges; the message brings merges {since}..{version - 1}, "
                             f"so {since - at} are missing")
        for k in range(at, version):
            merge_deltas(model, module_deltas(by_version.get((k, layer), {}), 1.0), family.fan_in_fan_out)
        stamps[layer] = version
        changed.append(layer)
    object.__setattr__(model, _VERSIONS, stamps)
    return changed


def merge_shapes(model: nn.Module, family: Family, layers: Iterable[int], targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Path -> (out, in) of every ``targets`` module in ``layers``: what merges into this model may touch."""
    shapes = {}
    for path, module in target_modules(model, family, layers, targets).items():
        weight = base_linear(module).weight
        shapes[path] = tuple(weight.shape[::-1] if family.fan_in_fan_out else weight.shape)
    return shapes

"""Noise-free aggregation of heterogeneous LoRA (FLoRA / HSplitLoRA): stacking, and merging into the base.

``stack_pair`` combines a module's adapters of any ranks exactly: with the sample weights p_k
folded into the A's, B_cat · A_cat = sum_k p_k B_k · A_k (alpha / r is one constant for every
rank, see ``adapters.lora.make_lora_config``, so no per-rank rescaling is needed). The stacked
rank is the sum of the ranks, so the published scheme does not keep it: each role that holds a
layer adds the aggregated delta (scaling x B_cat · A_cat) to its frozen base weight
(``merge_deltas``) and restarts its adapter with B = 0 (``restart_adapter``), which leaves the
model's function unchanged. These are the building blocks of the ``stack`` aggregator (issue 11);
no protocol uses them yet.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from splitfed.adapters.aggregate import A_SUFFIX, B_SUFFIX
from splitfed.adapters.importance import base_linear
from splitfed.adapters.lora import AdapterState, lora_layers


def stack_pair(a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat, B_cat) with B_cat @ A_cat = sum_k p_k B_k @ A_k, p = weights / sum(weights).

    A_k: (r_k, in), B_k: (out, r_k); A_cat: (sum r_k, in), B_cat: (out, sum r_k)."""
    total = sum(weights)
    if not a or len(a) != len(b) or len(a) != len(weights) or not total > 0:
        raise ValueError(f"stack_pair needs one (A, B, weight) per participant with positive total weight; got "
                         f"{len(a)} A, {len(b)} B, weights {weights}")
    return (torch.cat([ak * (w / total) for ak, w in zip(a, weights)], dim=0),
            torch.cat(list(b), dim=1))


def module_deltas(state: AdapterState, scaling: float) -> dict[str, torch.Tensor]:
    """Module path -> scaling x B @ A, (out, in), for every module of an adapter state."""
    return {key[: -len(A_SUFFIX)]: scaling * (state[key[: -len(A_SUFFIX)] + B_SUFFIX] @ tensor)
            for key, tensor in state.items() if key.endswith(A_SUFFIX)}


def merge_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], fan_in_fan_out: bool = False) -> None:
    """Add each (out, in) delta to the frozen weight of the module at its path (GPT-2's Conv1D stores (in, out))."""
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = base_linear(model.get_submodule(path)).weight
            weight += (delta.T if fan_in_fan_out else delta).to(weight.dtype)


def restart_adapter(model: nn.Module, name: str) -> None:
    """Re-initialise adapter ``name`` as PEFT does (A random, B = 0): its product, and so its effect, is zero."""
    for layer in lora_layers(model):
        if name in layer.lora_A:
            layer.reset_lora_parameters(name, True)

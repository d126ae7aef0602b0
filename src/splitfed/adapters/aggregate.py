"""Aggregation of adapter states across devices."""

from __future__ import annotations

import torch

from splitfed.adapters.lora import AdapterState, fit_rank


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Layer-by-layer weighted average (FedAvg) of adapter states.

    Each key is averaged over the states that hold it, with the weights of those states
    renormalised, so devices that cover different layers still average exactly per layer.
    Factors of different ranks are zero-padded to the largest rank first (HetLoRA);
    devices truncate the result back to their own rank when they load it.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state; got {len(states)} states and {len(weights)} weights")
    keys = sorted({k for state in states for k in state})
    result: AdapterState = {}
    for key in keys:
        holders = [(s[key], w) for s, w in zip(states, weights) if key in s]
        total = sum(w for _, w in holders)
        if total <= 0:
            raise ValueError(f"weights of the states holding {key!r} sum to {total}; they must be positive")
        shape = torch.Size(max(t.shape[i] for t, _ in holders) for i in range(holders[0][0].dim()))
        acc = torch.zeros(shape, dtype=torch.float64)
        for tensor, weight in holders:
            acc += fit_rank(tensor, shape).double() * (weight / total)
        result[key] = acc.to(holders[0][0].dtype)
    return result

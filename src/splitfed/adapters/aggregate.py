"""Aggregation strategies: combine adapter uploads of different layouts into one global adapter.

Every strategy is layer-aware: a key (one LoRA factor of one module of one layer) is combined
over the uploads that hold it, with their sample weights renormalised, so participants that
cover different layers (devices with different cuts, server slots) still combine exactly
per layer. A strategy implements ``combine`` (one key, its holders); the aggregator role
(``roles.aggregator``) applies it to whole states and slices the result for each participant's
layout, which fits it to its own rank when it loads it (``adapters.lora.set_adapter_state``).

- ``fedavg``: the sample-weighted average; holders of a key must have the same rank.
- ``zeropad`` (HetLoRA): factors are zero-padded to the largest rank, averaged, and each
  participant truncates the result back to its own rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.lora import AdapterState, fit_rank


@dataclass(frozen=True)
class Upload:
    """One participant's adapter after a round, with its layout and sample weight."""

    state: AdapterState
    layout: AdapterLayout
    weight: float


class Strategy:
    """How one key's tensors are combined, and how the global tensor is fitted to a participant."""

    name: ClassVar[str]

    def combine(self, key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        raise NotImplementedError


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float], shape: torch.Size) -> torch.Tensor:
    total = sum(weights)
    acc = torch.zeros(shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        acc += fit_rank(tensor, shape).double() * (weight / total)
    return acc.to(tensors[0].dtype)


class FedAvg(Strategy):
    name = "fedavg"

    def combine(self, key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) > 1:
            raise ValueError(
                f"aggregation.method 'fedavg': {key!r} arrives with shapes {shapes} (different ranks); "
                "use 'zeropad' for mixed ranks"
            )
        return _weighted_sum(tensors, weights, tensors[0].shape)


class ZeroPad(Strategy):
    name = "zeropad"

    def combine(self, key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        shape = torch.Size(max(t.shape[i] for t in tensors) for i in range(tensors[0].dim()))
        return _weighted_sum(tensors, weights, shape)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, ZeroPad)}


def combine_states(strategy: Strategy, states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Combine whole states key by key over the states that hold each key."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state; got {len(states)} states and {len(weights)} weights")
    result: AdapterState = {}
    for key in sorted({k for state in states for k in state}):
        holders = [(s[key], w) for s, w in zip(states, weights) if key in s]
        total = sum(w for _, w in holders)
        if not total > 0:
            raise ValueError(f"weights of the states holding {key!r} sum to {total}; they must be positive")
        result[key] = strategy.combine(key, [t for t, _ in holders], [w for _, w in holders])
    return result


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Layer-by-layer weighted average with zero-padding of mixed ranks (the ``zeropad`` strategy)."""
    return combine_states(ZeroPad(), states, weights)

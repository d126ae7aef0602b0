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
- ``svd`` (FlexLoRA): per module, the sample-weighted average of the full products B·A
  (alpha / r is the same for every rank, so the products need no rescaling), factored back by
  SVD at the largest rank with the components in descending order: truncating them to a
  participant's rank (as every participant does when it loads) is then the best rank-r
  approximation of the average, and exact when r is at least the average's rank.

- ``stack`` (FLoRA / HSplitLoRA): per module, the weighted A's stacked along the rank axis and
  the B's beside each other, so B_cat·A_cat = sum_k p_k B_k·A_k exactly, at rank sum_k r_k. That
  rank is not kept as an adapter: the aggregator (``roles.aggregator``) scales the pair into a
  *merge* (delta = B_cat·A_cat), every role adds it to its frozen base weights and all adapters
  restart (A fresh, B = 0), which leaves the model's function unchanged (``adapters.merge``).

Averaging factors (``fedavg``, ``zeropad``) is not averaging products: mean(B)·mean(A) has
cross terms B_j·A_k (j != k) that no participant trained; ``svd`` and ``stack`` have none.
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
    """How the tensors of one key (or of one module's factor pair) are combined."""

    name: ClassVar[str]
    merges: ClassVar[bool] = False
    """The combined pairs are merged into the base weights (and adapters restart) instead of being the new adapter."""

    def combine(self, key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        raise NotImplementedError

    def combine_pair(self, module: str, a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's (lora_A, lora_B) from its holders' factors: by default each factor on its own."""
        return self.combine(module + A_SUFFIX, a, weights), self.combine(module + B_SUFFIX, b, weights)


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


class SVD(Strategy):
    name = "svd"

    def combine(self, key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        raise ValueError(f"aggregation.method {self.name!r} combines lora_A and lora_B of a module together; "
                         f"{key!r} has no partner factor")

    def combine_pair(self, module: str, a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        total = sum(weights)
        product = sum((w / total) * (bk.double() @ ak.double()) for ak, bk, w in zip(a, b, weights))
        new_a, new_b, _ = low_rank_factors(product, max(ak.shape[0] for ak in a))
        return new_a.to(a[0].dtype).contiguous(), new_b.to(b[0].dtype).contiguous()


def low_rank_factors(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, tail) with B @ A the best rank-``rank`` approximation of the (out, in) ``product``,
    components in descending order (truncating them is again the best approximation), and
    tail = ||product - B @ A||_F^2 (0 when the product's rank is at most ``rank``)."""
    u, singular, vh = torch.linalg.svd(product, full_matrices=False)
    root = singular[:rank].sqrt()  # rank may exceed min(out, in): the missing components are zero
    new_a = fit_rank(root[:, None] * vh[:rank], torch.Size((rank, product.shape[1])))
    new_b = fit_rank(u[:, :rank] * root, torch.Size((product.shape[0], rank)))
    return new_a, new_b, float((singular[rank:] ** 2).sum())


def stack_pair(a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat, B_cat) with B_cat @ A_cat = sum_k p_k B_k @ A_k, p = weights / sum(weights).

    A_k: (r_k, in), B_k: (out, r_k); A_cat: (sum r_k, in), B_cat: (out, sum r_k). alpha / r is
    one constant for every rank (``adapters.lora.make_lora_config``), so no per-rank rescaling."""
    total = sum(weights)
    if not a or len(a) != len(b) or len(a) != len(weights) or not total > 0:
        raise ValueError(f"stack_pair needs one (A, B, weight) per participant with positive total weight; got "
                         f"{len(a)} A, {len(b)} B, weights {weights}")
    return (torch.cat([ak * (w / total) for ak, w in zip(a, weights)], dim=0),
            torch.cat(list(b), dim=1))


class Stack(SVD):
    name = "stack"
    merges = True

    def combine_pair(self, module: str, a: list[torch.Tensor], b: list[torch.Tensor], weights: list[float]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return stack_pair(a, b, weights)


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, ZeroPad, SVD, Stack)}
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def combine_states(strategy: Strategy, states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Combine whole states module by module (a module's factor pair together) over the states that hold it."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state; got {len(states)} states and {len(weights)} weights")
    result: AdapterState = {}
    paired: set[str] = set()
    for key in sorted({k for state in states for k in state}):
        if key in paired:
            continue  # combined with its lora_A
        holders = [(s, w) for s, w in zip(states, weights) if key in s]
        total = sum(w for _, w in holders)
        if not total > 0:
            raise ValueError(f"weights of the states holding {key!r} sum to {total}; they must be positive")
        module, partner = key[: -len(A_SUFFIX)], key[: -len(A_SUFFIX)] + B_SUFFIX
        if key.endswith(A_SUFFIX) and all(partner in s for s, _ in holders):
            result[key], result[partner] = strategy.combine_pair(
                module, [s[key] for s, _ in holders], [s[partner] for s, _ in holders], [w for _, w in holders])
            paired.add(partner)
        else:
            result[key] = strategy.combine(key, [s[key] for s, _ in holders], [w for _, w in holders])
    return result


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """Layer-by-layer weighted average with zero-padding of mixed ranks (the ``zeropad`` strategy)."""
    return combine_states(ZeroPad(), states, weights)

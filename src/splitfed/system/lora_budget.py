"""HSplitLoRA's device configuration from budgets: cut, LoRA placement and ranks under a memory budget.

For one device: the deepest cut at which its frozen layers, their saved activations and the
smallest LoRA on every candidate matrix fit the budget (a deeper cut leaves the server less
to do); then, most important matrix first (``adapters.importance``), each matrix gets the
largest rank of the rank set that still fits, or no LoRA at all when not even the smallest
does. Memory is the cost model's estimate (``system.costs``), never above the budget.

``ranking_shift`` measures how far an importance ranking moved (the fraction of discordant
pairs, Kendall's distance), so a run reconfigures only past a threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations

from splitfed.system.costs import ADAM_SLOTS, FP32, LayerCosts, stage_memory

Matrix = tuple[int, str]
"""(decoder layer, module path inside the layer, e.g. ``self_attn.q_proj``)."""
DEFAULT_RANKS = (2, 4, 8, 16)


class BudgetError(ValueError):
    """A device whose budget cannot hold what it must (one layer); the text names it."""


@dataclass(frozen=True)
class DeviceLoRA:
    """One device's configuration: its cut and the rank of each matrix that carries LoRA."""

    cut: int
    ranks: dict[Matrix, int] = field(default_factory=dict)
    memory_bytes: int = 0
    """The cost model's estimate of the device's peak memory with this configuration."""


def matrix_lora_bytes(in_features: int, out_features: int, rank: int, batch: int, seq: int) -> float:
    """LoRA of rank ``rank`` on one matrix: weights, gradients and Adam state, plus the saved (batch, seq, rank) input of B."""
    return rank * (in_features + out_features) * FP32 * (2 + ADAM_SLOTS) + batch * seq * rank * FP32


def configure_device(costs: LayerCosts, importance: Mapping[Matrix, float], budget_bytes: float, *, max_cut: int,
                     batch: int, seq: int, ranks: tuple[int, ...] = DEFAULT_RANKS, device: str = "device") -> DeviceLoRA:
    """The device's cut, placement and ranks (see the module docstring); BudgetError if one layer does not fit."""
    shapes = {lin.path: (lin.in_features, lin.out_features) for lin in costs.linears if lin.lora}
    smallest = min(ranks)

    def base_bytes(cut: int) -> float:
        return stage_memory(costs, cut, 0, batch, seq, first=True, last=False).total

    def floor_bytes(cut: int) -> float:  # the cut's layers with the smallest rank on every candidate matrix
        return base_bytes(cut) + cut * sum(matrix_lora_bytes(i, o, smallest, batch, seq) for i, o in shapes.values())

    fitting = [cut for cut in range(1, max_cut + 1) if floor_bytes(cut) <= budget_bytes]
    if not fitting:
        need = floor_bytes(1) / (1 << 20)
        raise BudgetError(f"{device}: a memory budget of {budget_bytes / (1 << 20):g} MB cannot hold one layer with "
                          f"rank-{smallest} LoRA ({need:.1f} MB estimated); raise devices.memory_mb")
    cut = max(fitting)
    candidates = [(layer, path) for layer in range(cut) for path in shapes]
    order = sorted(candidates, key=lambda m: (-importance.get(m, 0.0), m))  # ties: by position, deterministic
    used = base_bytes(cut)
    chosen: dict[Matrix, int] = {}
    for matrix in order:
        in_features, out_features = shapes[matrix[1]]
        for rank in sorted(ranks, reverse=True):
            extra = matrix_lora_bytes(in_features, out_features, rank, batch, seq)
            if used + extra <= budget_bytes:
                chosen[matrix] = rank
                used += extra
                break
    return DeviceLoRA(cut, chosen, int(used))


def ranking_shift(before: Mapping[Matrix, float], after: Mapping[Matrix, float]) -> float:
    """Fraction of the pairs of matrices (scored in both) whose order differs: 0 same ranking, 1 reversed."""
    common = sorted(before.keys() & after.keys())
    pairs = list(combinations(common, 2))
    if not pairs:
        return 0.0
    discordant = sum((before[a] - before[b]) * (after[a] - after[b]) < 0 for a, b in pairs)
    return discordant / len(pairs)

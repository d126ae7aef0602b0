"""Adapter layouts: which decoder layers and modules carry LoRA, and at what rank.

A layout may differ per participant (a device's cut decides its layers, its budget its rank)
and travels with every upload, so aggregators know what each adapter covers. The exported
PEFT adapter describes mixed ranks with ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterLayout:
    layers: range
    """Decoder layers that carry LoRA."""
    targets: tuple[str, ...]
    """Module names (e.g. ``q_proj``) that carry LoRA in each of those layers."""
    rank: int
    alpha_per_rank: float
    """alpha = alpha_per_rank * rank, so alpha / r is the same for every rank."""

    @property
    def alpha(self) -> float:
        return self.alpha_per_rank * self.rank

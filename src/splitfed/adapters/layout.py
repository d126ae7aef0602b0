"""Adapter layouts: which decoder layers and modules carry LoRA, and at what rank.

A layout may differ per participant (a device's cut decides its layers, its budget its rank)
and travels with every upload, so aggregators know what each adapter covers. A layout either
puts LoRA of one rank on every target module of its layers, or (HSplitLoRA) lists the matrices
that carry LoRA with a rank each (``placement``). The exported PEFT adapter describes mixed ranks
with ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Placement = tuple[tuple[int, str, int], ...]
"""(decoder layer, module path inside the layer such as ``self_attn.q_proj``, rank) per matrix with LoRA."""


def placement_rank(placement: Placement) -> int:
    """The largest rank of a placement: the rank its adapter is declared with."""
    return max(rank for *_, rank in placement)


@dataclass(frozen=True)
class AdapterLayout:
    layers: range
    """Decoder layers that carry LoRA."""
    targets: tuple[str, ...]
    """Module names (e.g. ``q_proj``) that carry LoRA in each of those layers."""
    rank: int
    """The rank of every module; with a ``placement``, the largest of its ranks."""
    alpha_per_rank: float
    """alpha = alpha_per_rank * rank, so alpha / r is the same for every rank."""
    placement: Placement = ()
    """If given, exactly these matrices carry LoRA, each at its own rank (``targets`` is then unused)."""

    @property
    def alpha(self) -> float:
        return self.alpha_per_rank * self.rank

    def with_placement(self, placement: Placement) -> AdapterLayout:
        """This layout with exactly ``placement``'s matrices carrying LoRA; ``rank`` becomes their largest rank."""
        return replace(self, placement=placement, rank=placement_rank(placement))

    def rank_of(self, layer: int, path: str) -> int | None:
        """The rank of the matrix at ``path`` (e.g. ``self_attn.q_proj``) in ``layer``; None: no LoRA there."""
        if not self.placement:
            in_layer = layer in self.layers and any(path == t or path.endswith(f".{t}") for t in self.targets)
            return self.rank if in_layer else None
        return next((rank for at, where, rank in self.placement if at == layer and where == path), None)

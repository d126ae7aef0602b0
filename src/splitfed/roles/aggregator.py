"""The aggregator role: keeps the global full-depth LoRA and averages the round's uploads."""

from __future__ import annotations

from splitfed.adapters.aggregate import weighted_average
from splitfed.adapters.lora import AdapterState, slice_layers
from splitfed.models.families import Family


class Aggregator:
    def __init__(self, initial: AdapterState, family: Family) -> None:
        self.global_state = initial
        self.family = family

    def slice(self, layers: range) -> AdapterState:
        """The global adapter on ``layers`` (what a device or server slot downloads)."""
        return slice_layers(self.global_state, self.family, layers)

    def aggregate(self, uploads: list[tuple[AdapterState, float]]) -> None:
        """Sample-weighted, layer-by-layer FedAvg of full-depth uploads into the global state."""
        averaged = weighted_average([s for s, _ in uploads], [w for _, w in uploads])
        self.global_state = {**self.global_state, **averaged}

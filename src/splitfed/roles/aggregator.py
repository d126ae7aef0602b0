"""The aggregator role: keeps the global full-depth LoRA and combines each round's uploads
with the configured strategy (``aggregation.method``, see ``adapters.aggregate``)."""

from __future__ import annotations

from splitfed.adapters.aggregate import STRATEGIES, Upload, combine_states
from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.lora import AdapterState, slice_layers
from splitfed.models.families import Family


class Aggregator:
    """The global full-depth adapter and the strategy that updates it from a round's uploads."""

    def __init__(self, initial: AdapterState, family: Family, method: str) -> None:
        if method not in STRATEGIES:
            raise ValueError(f"unknown aggregation method {method!r}; allowed: {', '.join(STRATEGIES)}")
        self.global_state = initial
        self.family = family
        self.strategy = STRATEGIES[method]()

    def download_for(self, layout: AdapterLayout) -> AdapterState:
        """The global adapter on ``layout``'s layers (participants fit it to their rank when they load it)."""
        return slice_layers(self.global_state, self.family, layout.layers)

    def aggregate(self, uploads: list[Upload]) -> None:
        """Combine the round's uploads into the global adapter (keys nobody uploaded keep their value)."""
        combined = combine_states(self.strategy, [u.state for u in uploads], [u.weight for u in uploads])
        self.global_state = {**self.global_state, **combined}

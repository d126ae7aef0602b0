"""The aggregator role: keeps the global full-depth LoRA and combines each round's uploads
with the configured strategy (``aggregation.method``, see ``adapters.aggregate``).

A merging strategy (``stack``) leaves no aggregate adapter: each round's combined pairs become
merge number k (``adapters.merge``), scaled so that delta = B @ A, and the global adapter
restarts (A drawn afresh from a seed of the merge number, B = 0). The merges are kept: a role
that missed rounds, or a process that restarts, catches up from them, and the export sums them.
"""

from __future__ import annotations

import math

import torch

from splitfed.adapters.aggregate import A_SUFFIX, STRATEGIES, Upload, combine_states
from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.lora import AdapterState, fit_rank, layer_of, slice_layers
from splitfed.adapters.merge import merge_key, module_deltas
from splitfed.models.families import Family
from splitfed.seeding import Purpose, derive_seed


def restarted(state: AdapterState, seed: int) -> AdapterState:
    """``state`` with every lora_A drawn as PEFT initialises it (Kaiming-uniform, a = sqrt(5)) from
    ``seed`` and every lora_B zero: an adapter with no effect, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    fresh = {}
    for key in sorted(state):
        tensor = torch.zeros_like(state[key])
        if key.endswith(A_SUFFIX):
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        fresh[key] = tensor
    return fresh


class Aggregator:
    """The global full-depth adapter and the strategy that updates it from a round's uploads."""

    def __init__(self, initial: AdapterState, family: Family, method: str, scaling: float = 1.0,
                 seed: int = 0) -> None:
        if method not in STRATEGIES:
            raise ValueError(f"unknown aggregation method {method!r}; allowed: {', '.join(STRATEGIES)}")
        self.global_state = initial
        self.family = family
        self.strategy = STRATEGIES[method]()
        self.scaling = scaling
        """alpha / r of every adapter: folded into the merges."""
        self.seed = seed
        """The run seed: the global adapter after merge k restarts from derive_seed(seed, ADAPTER_RESTART, k)."""
        self.merges: list[AdapterState] = []
        """Merge k: per module, (A, B) with delta = B @ A (merging strategies only)."""

    @property
    def version(self) -> int:
        """Number of merges so far (0 for strategies that do not merge)."""
        return len(self.merges)

    def download_for(self, layout: AdapterLayout) -> AdapterState:
        """The global adapter on ``layout``'s layers, fitted to its rank (truncated or zero-padded):
        each participant receives exactly the tensors it loads."""
        prefix = self.family.layers_path + "."
        fitted = {}
        for key, tensor in slice_layers(self.global_state, self.family, layout.layers).items():
            layer, _, rest = key[len(prefix):].partition(".")
            rank = layout.rank_of(int(layer), rest.rsplit(".lora_", 1)[0])
            if rank is not None:
                shape = (rank, tensor.shape[1]) if key.endswith(A_SUFFIX) else (tensor.shape[0], rank)
                fitted[key] = fit_rank(tensor, torch.Size(shape))
        return fitted

    def merges_for(self, layers: range, since: int) -> AdapterState:
        """Merges ``since`` .. version - 1 of the modules in ``layers``, keyed ``"<k>/<key>"``."""
        return {merge_key(k, key): tensor for k in range(since, self.version)
                for key, tensor in self.merges[k].items() if layer_of(key, self.family) in layers}

    def aggregate(self, uploads: list[Upload]) -> None:
        """Combine the round's uploads into the global adapter (keys nobody uploaded keep their value),
        or, for a merging strategy, into the next merge (and restart the global adapter)."""
        combined = combine_states(self.strategy, [u.state for u in uploads], [u.weight for u in uploads])
        if not self.strategy.merges:
            self.global_state = {**self.global_state, **combined}
            return
        self.merges.append({k: (t * self.scaling if k.endswith(A_SUFFIX) else t).contiguous()
                            for k, t in combined.items()})
        self.global_state = restarted(self.global_state, derive_seed(self.seed, Purpose.ADAPTER_RESTART, self.version))

    def accumulated_deltas(self) -> dict[str, torch.Tensor]:
        """Module path -> the sum of all merges' B @ A, (out, in): what the base weights gained."""
        total: dict[str, torch.Tensor] = {}
        for merge in self.merges:
            for module, delta in module_deltas({k: t.double() for k, t in merge.items()}, 1.0).items():
                total[module] = total[module] + delta if module in total else delta
        return total

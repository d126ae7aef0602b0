"""Cut resolution: how many layers each device holds, from ``devices.cuts`` or its memory budget.

Used by the engine and the planners alike (so the planner never imports the engine). A protocol
says whether its devices share one cut (``common``): then the cut is the deepest that fits
EVERY device's budget, since the shared server stage starts right above it.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from splitfed.config import ConfigError, RunConfig
from splitfed.models.families import num_layers
from splitfed.system.costs import deepest_cut, device_memory_bytes, layer_costs

MB = 1024 * 1024


def resolve_cuts(config: RunConfig, model_config: PretrainedConfig, *, common: bool) -> list[int]:
    """Cut depth per device: ``devices.cuts``, or the deepest cut that fits ``devices.memory_mb``."""
    total = num_layers(model_config)
    train = config.train
    costs = layer_costs(model_config, config.lora.targets) if config.devices.memory_mb else None
    cuts = []
    for u in range(config.devices.count):
        cut = config.device_cut(u)
        if cut is None:
            rank = config.device_rank(u)
            cut = deepest_cut(costs, config.device_memory_mb(u) * MB, total - 1, rank, train.batch_size, train.seq_len)
            if cut == 0:
                need = device_memory_bytes(costs, 1, rank, train.batch_size, train.seq_len) / MB
                raise ConfigError(
                    f"devices.memory_mb: device {u} has {config.device_memory_mb(u):g} MB, which cannot hold "
                    f"even one layer (needs at least {need:.0f} MB at batch {train.batch_size} x {train.seq_len})"
                )
        if cut > total - 1:
            raise ConfigError(
                f"devices.cuts: cut {cut} of device {u} is past the last layer a device may hold; "
                f"allowed 1..{total - 1} for this {total}-layer model"
            )
        cuts.append(cut)
    if common and cuts:
        cuts = [min(cuts)] * len(cuts)  # the deepest cut every device can hold
    return cuts

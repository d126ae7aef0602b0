"""SplitFed with one shared server-side model (SplitLoRA, SFT, FedsLLM).

All devices use the same cut. The server keeps ONE server-side LoRA, trained on every
device's activations: together in one concatenated batch (``mode = "parallel"``) or one
device after another in arrival order (``"sequential"``). Device LoRA is averaged
(sample-weighted) every round.

    [sfl]
    mode = "parallel"   # or "sequential"
"""

from __future__ import annotations

from typing import Literal

from splitfed.config import ProtocolOptions, RunConfig
from splitfed.protocols.split import SplitProtocol
from splitfed.registry import register
from splitfed.topology import Route, StagePlacement, Topology


class SflOptions(ProtocolOptions):
    mode: Literal["parallel", "sequential"] = "parallel"
    """Process the devices' batches together, or one by one in arrival order."""


def device_stage(config: RunConfig, device: int, cut: int) -> StagePlacement:
    """Device ``device``'s first stage: embeddings + layers [0, cut), its own slot."""
    name = f"device{device}"
    return StagePlacement(name, "device", 0, cut, True, False, name, config.device_rank(device))


@register
class SplitFed(SplitProtocol):
    name = "sfl"
    Options = SflOptions
    common_cut = True
    per_device_cuts = "memsfl"

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        rank = max(config.device_rank(u) for u in range(config.devices.count))
        routes = tuple(
            Route(u, (device_stage(config, u, cut),
                      StagePlacement("server", "server", cut, total_layers, False, True, "server", rank)))
            for u, cut in enumerate(cuts)
        )
        return Topology(routes, aggregator="server")

    @classmethod
    def serves_together(cls, config: RunConfig) -> bool:
        return config.options.mode == "parallel"

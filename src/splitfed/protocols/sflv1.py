"""SplitFed-V1 baseline: a separate copy of the server-side model per device.

The copies (each with its own LoRA) train in parallel; device-side and server-side LoRA
are both averaged at round end. At equal cuts this is the same mathematics as memsfl, with
N copies of the server-side base weights: the memory comparison the memsfl paper makes.
"""

from __future__ import annotations

from splitfed.config import RunConfig
from splitfed.protocols.memsfl import per_device_server_routes
from splitfed.protocols.split import SplitProtocol
from splitfed.registry import register
from splitfed.topology import Topology


@register
class SplitFedV1(SplitProtocol):
    name = "sflv1"

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        return per_device_server_routes(config, cuts, total_layers, copies=True)

"""Memory-efficient split federated learning on heterogeneous devices.

Each device has its own cut depth. The server holds ONE full base model and, per device,
a server-side LoRA for the layers above that device's cut; it serves the devices one at a
time in the order of ``scheduler`` (splitfed.system.schedule), computed from the system
model's predicted timings. At round end each device's full-depth LoRA (device part +
server part) is averaged layer by layer.

    [memsfl]
    scheduler = "fifo"   # fifo | schrage | exact | random
"""

from __future__ import annotations

from typing import Literal

from splitfed.config import ProtocolOptions, RunConfig
from splitfed.protocols.sfl import device_stage
from splitfed.protocols.split import SplitProtocol
from splitfed.registry import register
from splitfed.topology import Route, StagePlacement, Topology


class MemsflOptions(ProtocolOptions):
    scheduler: Literal["fifo", "schrage", "exact", "random"] = "fifo"
    """Order in which the server serves the devices."""


def per_device_server_routes(config: RunConfig, cuts: list[int], total_layers: int, copies: bool) -> Topology:
    """Device u -> its own server slot on layers [cut_u, L); ``copies``: each slot on its own base copy."""
    routes = tuple(
        Route(u, (device_stage(config, u, cut),
                  StagePlacement("server", "server", cut, total_layers, False, True, f"server{u}",
                                 config.device_rank(u), base=f"copy{u}" if copies else "")))
        for u, cut in enumerate(cuts)
    )
    return Topology(routes, aggregator="server")


@register
class MemorySplitFed(SplitProtocol):
    name = "memsfl"
    Options = MemsflOptions

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        return per_device_server_routes(config, cuts, total_layers, copies=False)

    @classmethod
    def serves_together(cls, config: RunConfig) -> bool:
        return False

    @classmethod
    def scheduled(cls, config: RunConfig) -> bool:
        return True

    @classmethod
    def scheduler(cls, config: RunConfig) -> str:
        return config.options.scheduler

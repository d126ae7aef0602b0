"""Memory-efficient split federated learning on heterogeneous devices.

Each device has its own cut depth. The server holds ONE full base model and, per device,
a server-side LoRA for the layers above that device's cut; it serves the devices one at a
time in the order of ``server.scheduler`` (splitfed.planning.schedule), computed from the
system model's predicted timings. At round end each device's full-depth LoRA (device
part + server part) is averaged layer by layer.
"""

from __future__ import annotations

from splitfed.models.split import Stage
from splitfed.planning.schedule import serving_order
from splitfed.protocols.split import SplitProtocol


class MemorySplitFed(SplitProtocol):
    name = "memsfl"

    def build_server(self) -> None:
        for u in self.devices:
            spec = self.server_spec(u)
            self.add_adapter(f"server{u}", self.config.device_rank(u), spec.layers)
            self.server.add_slot([u], Stage(self.model, spec, self.family), f"server{u}")

    def groups(self, participants: list[int]) -> list[list[int]]:
        order = serving_order(self.clock, participants, self.config.server.scheduler, self.config.seed, self.step_index)
        return [[u] for u in order]

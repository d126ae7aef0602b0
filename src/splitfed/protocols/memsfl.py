"""Memory-efficient split federated learning on heterogeneous devices.

Each device has its own cut depth. The server holds ONE full base model and, per device,
a server-side LoRA for the layers above that device's cut; it serves the devices one at a
time (arrival order; a scheduler can reorder later). At round end each device's
full-depth LoRA (device part + server part) is averaged layer by layer.
"""

from __future__ import annotations

from splitfed.models.split import Stage
from splitfed.protocols.split import SplitProtocol


class MemorySplitFed(SplitProtocol):
    name = "memsfl"

    def build_server(self) -> None:
        for u in self.devices:
            spec = self.server_spec(u)
            self.add_adapter(f"server{u}", self.config.device_rank(u), spec.layers)
            self.server.add_slot([u], Stage(self.model, spec, self.family), f"server{u}")

    def groups(self, participants: list[int]) -> list[list[int]]:
        return [[u] for u in participants]

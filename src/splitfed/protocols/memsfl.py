"""Memory-efficient split federated learning on heterogeneous devices.

Each device has its own cut depth. The server holds ONE full base model and, per device,
a server-side LoRA for the layers above that device's cut; it serves the devices one at a
time in the order of ``server.scheduler`` (splitfed.planning.schedule), computed from the
system model's predicted timings. At round end each device's full-depth LoRA (device
part + server part) is averaged layer by layer.
"""

from __future__ import annotations

import numpy as np

from splitfed.models.split import Stage
from splitfed.planning.schedule import Job, schedule
from splitfed.seeding import derive_seed
from splitfed.protocols.split import SplitProtocol


class MemorySplitFed(SplitProtocol):
    name = "memsfl"

    def build_server(self) -> None:
        for u in self.devices:
            spec = self.server_spec(u)
            self.add_adapter(f"server{u}", self.config.device_rank(u), spec.layers)
            self.server.add_slot([u], Stage(self.model, spec, self.family), f"server{u}")

    def groups(self, participants: list[int]) -> list[list[int]]:
        timings = [self.clock.timing(u) for u in participants]
        jobs = [Job(t.head_s, t.server_s, t.tail_s) for t in timings]
        rng = np.random.default_rng(derive_seed(self.config.seed, 4, self.step_index))
        return [[participants[j]] for j in schedule(self.config.server.scheduler, jobs, rng)]

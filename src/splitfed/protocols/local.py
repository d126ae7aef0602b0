"""Round logic shared by the unsplit references (fedlora, centralized): every trainer holds the
whole model with LoRA (a route of one stage), takes local steps, and the adapters are
averaged at round end."""

from __future__ import annotations

import time
from typing import ClassVar

from splitfed.config import RunConfig
from splitfed.protocols.base import Protocol
from splitfed.topology import Route, StagePlacement, Topology


class LocalProtocol(Protocol):
    split = False
    tier: ClassVar[str] = "device"
    """Where the whole-model trainers run."""

    @classmethod
    def trainers(cls, config: RunConfig) -> int:
        return config.devices.count

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        routes = tuple(
            Route(u, (StagePlacement(f"device{u}", cls.tier, 0, total_layers, True, True, f"device{u}",
                                     config.device_rank(u)),))
            for u in range(cls.trainers(config))
        )
        return Topology(routes, aggregator="server")

    def train_round(self, round_index: int, participants: list[int]) -> None:
        self.clock.begin_round(round_index, participants)
        active = list(participants)  # devices still in the round (remote ones may drop)
        self.download_adapters(round_index, participants, active)
        self.clock.transfer(self.take_sent())
        self.link.clear_pending()  # adapter downloads are counted per round, not per step
        for step in range(self.config.train.local_steps):
            started, lr = time.perf_counter(), self.current_lr()
            done = self.clock.local_step(list(active))
            replies = {u: self.first(u)[0].local_step(self.first(u)[1].slot, lr) for u in active}
            for u in list(active):
                result = self.attempt(u, round_index, step, active, replies[u].result)
                if result is not None:
                    self.log_step(round_index, step, u, *result, started, done[u])
            self.step_index += 1
        uploads = self.upload_adapters(round_index, active)
        self.clock.transfer(self.take_sent())
        self.require_quorum(round_index, participants, active)
        self.aggregate(uploads)

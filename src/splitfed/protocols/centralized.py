"""Centralized LoRA: one trainer on the pooled data of all devices, no network. The quality
reference: split protocols with one device must match it step by step."""

from __future__ import annotations

from splitfed.config import RunConfig
from splitfed.data.batches import TokenDataset
from splitfed.protocols.local import LocalProtocol
from splitfed.registry import register
from splitfed.topology import Topology


@register
class Centralized(LocalProtocol):
    name = "centralized"
    tier = "server"

    @classmethod
    def trainers(cls, config: RunConfig) -> int:
        return 1

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        topology = super().topology(config, cuts, total_layers)
        trainer = topology.routes[0].first.worker
        return Topology(topology.routes, aggregator=trainer)  # the trainer aggregates: nothing is sent

    def dataset(self, device: int):
        return TokenDataset.concat(self.ctx.data.train)

    def participants(self, round_index: int) -> list[int]:
        return [0]

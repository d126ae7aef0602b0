"""Centralized LoRA: one trainer on the pooled data of all devices, no network. The quality
reference: split protocols with one device must match it step by step."""

from __future__ import annotations

from splitfed.data.batches import TokenDataset
from splitfed.protocols.local import LocalProtocol


class Centralized(LocalProtocol):
    name = "centralized"
    federated = False

    def datasets(self) -> list[TokenDataset]:
        return [TokenDataset.concat(self.ctx.data.train)]

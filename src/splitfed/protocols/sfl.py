"""SplitFed with one shared server-side model (SplitLoRA, SFT, FedsLLM).

All devices use the same cut. The server keeps ONE server-side LoRA, trained on every
device's activations: together in one concatenated batch (``server.mode = "parallel"``)
or one device after another in arrival order (``"sequential"``). Device LoRA is
FedAvg'd (sample-weighted) every round.
"""

from __future__ import annotations

from splitfed.models.split import Stage
from splitfed.protocols.split import SplitProtocol


class SplitFed(SplitProtocol):
    name = "sfl"

    def build_server(self) -> None:
        spec = self.server_spec(0)
        self.add_adapter("server", self.global_rank, spec.layers)
        self.server.add_slot(list(self.devices), Stage(self.model, spec, self.family), "server")

    def groups(self, participants: list[int]) -> list[list[int]]:
        if self.config.server.mode == "parallel":
            return [participants]
        return [[u] for u in participants]

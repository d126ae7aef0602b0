"""SplitFed-V1 baseline: a separate copy of the server-side model per device.

The copies (each with its own LoRA) train in parallel; device-side and server-side LoRA
are both averaged at round end. At equal cuts this is the same mathematics as memsfl, with
N copies of the server-side base weights: the memory comparison the memsfl paper makes.
"""

from __future__ import annotations

from splitfed.models.loading import load_stage_model
from splitfed.models.split import Stage
from splitfed.protocols.split import SplitProtocol


class SplitFedV1(SplitProtocol):
    name = "sflv1"

    def build_server(self) -> None:
        for u in self.devices:
            spec = self.server_spec(u)
            copy = load_stage_model(self.ctx.model_dir, spec)
            self.add_adapter(f"server{u}", self.config.device_rank(u), spec.layers, model=copy)
            self.server.add_slot([u], Stage(copy, spec, self.family), f"server{u}")

    def groups(self, participants: list[int]) -> list[list[int]]:
        return [participants]

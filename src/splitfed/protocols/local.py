"""Round logic shared by the unsplit references (fedlora, centralized): every trainer holds the
whole model with LoRA, takes local steps, and the adapters are averaged at round end."""

from __future__ import annotations

import time

from splitfed.data.batches import TokenDataset
from splitfed.models.split import StageSpec
from splitfed.protocols.base import Protocol
from splitfed.wire.messages import Message


class LocalProtocol(Protocol):
    federated = True

    def datasets(self) -> list[TokenDataset]:
        return self.ctx.data.train

    def build(self) -> None:
        whole = StageSpec(0, self.total_layers, first=True, last=True)
        for u, data in enumerate(self.datasets()):
            self.devices[u] = self.make_device(u, whole, data)

    def participants(self, round_index: int) -> list[int]:
        return super().participants(round_index) if self.federated else [0]

    def _transfer(self, device: int, message: Message, direction: str) -> Message:
        if not self.federated:
            return message
        return self.up(device, message) if direction == "up" else self.down(device, message)

    def train_round(self, round_index: int, participants: list[int]) -> None:
        devices = self.devices
        self.clock.begin_round(round_index, participants)
        active = list(participants)  # devices still in the round (remote ones may drop)
        for u in participants:
            message = Message("adapter_download", "aggregator", round_index, 0, self.aggregator.global_state)
            self.attempt(u, round_index, 0, active, lambda: devices[u].download(self._transfer(u, message, "down")))
        self.clock.transfer(self.take_sent(), "down")
        self.link.clear_pending()  # adapter downloads are counted per round, not per step
        for step in range(self.config.train.local_steps):
            started, lr = time.perf_counter(), self.current_lr()
            done = self.clock.local_step(list(active), on_server=not self.federated)
            for u in list(active):
                result = self.attempt(u, round_index, step, active, lambda: devices[u].local_step(lr))
                if result is not None:
                    self.log_step(round_index, step, u, *result, started, done[u])
            self.step_index += 1
        uploads = []
        for u in list(active):
            upload = self.attempt(u, round_index, 0, active,
                                  lambda: self._transfer(u, devices[u].upload(round_index), "up"))
            if upload is not None:
                uploads.append((upload.tensors, float(upload.values["num_samples"])))
        self.clock.transfer(self.take_sent(), "up")
        self.require_quorum(round_index, participants, active)
        self.aggregator.aggregate(uploads)

    def memory(self) -> dict[str, int]:
        return {
            "peak_mem_device_bytes": max(d.peak_bytes() for d in self.devices.values()),
            "peak_mem_server_bytes": 0,
            "trainable_params_device": max(d.trainable_params for d in self.devices.values()),
            "trainable_params_server": 0,
        }

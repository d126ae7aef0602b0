"""Round logic shared by the two-tier split protocols (sfl, memsfl, sflv1).

Per local step, for each group of devices the server serves together:
  device -> server  activations (hidden, attention mask, labels)
  server -> device  activation gradient, loss, server grad norm
  device -> server  device grad norm          (clipping uses the norm over both sides)
  server -> device  clipping factor; both sides step
At round end every participant uploads its device LoRA; joined with the server-side
LoRA that served it, it forms a full-depth adapter, and the aggregator averages those
layer by layer into the global adapter that devices and server slots load next round.
"""

from __future__ import annotations

import time
from abc import abstractmethod

from splitfed.adapters.lora import get_adapter_state, set_adapter_state
from splitfed.models.split import StageSpec
from splitfed.protocols.base import Protocol
from splitfed.roles.server import Server, ServerSlot
from splitfed.wire.messages import Message


class SplitProtocol(Protocol):
    def build(self) -> None:
        for u in range(self.config.devices.count):
            spec = StageSpec(0, self.ctx.cuts[u], first=True, last=False)
            self.devices[u] = self.make_device(u, spec, self.ctx.data.train[u])
        self.server = Server(self.config.train)
        self.build_server()

    def server_spec(self, device: int) -> StageSpec:
        return StageSpec(self.ctx.cuts[device], self.total_layers, first=False, last=True)

    @abstractmethod
    def build_server(self) -> None:
        """Create the server slots and assign every device to one."""

    @abstractmethod
    def groups(self, participants: list[int]) -> list[list[int]]:
        """Devices the server serves together, in serving order."""

    def _load_slot(self, slot: ServerSlot) -> None:
        set_adapter_state(slot.stage.model, slot.adapter, self.aggregator.slice(slot.stage.spec.layers))

    def train_round(self, round_index: int, participants: list[int]) -> None:
        devices, server, clock = self.devices, self.server, self.clock
        clock.begin_round(round_index, participants)
        active = list(participants)  # devices still in the round (remote ones may drop)
        for u in participants:
            state = self.aggregator.slice(devices[u].layers)
            download = Message("adapter_download", "aggregator", round_index, 0, state)
            self.attempt(u, round_index, 0, active, lambda: devices[u].download(self.down(u, download)))
        for slot in {id(server.slots[u]): server.slots[u] for u in active}.values():
            self._load_slot(slot)
        clock.transfer(self.take_sent(), "down")

        self.link.clear_pending()  # adapter downloads are counted per round, not per step
        for step in range(self.config.train.local_steps):
            started, lr = time.perf_counter(), self.current_lr()
            groups = self.groups(list(active))
            for group in groups:
                arrivals = []
                for u in group:
                    sent = self.attempt(u, round_index, step, active, lambda: devices[u].forward(round_index, step))
                    if sent is not None:
                        arrivals.append((u, self.up(u, sent)))
                gradients = server.process(arrivals)
                norms = {}
                for u, _ in arrivals:
                    reply = self.attempt(u, round_index, step, active,
                                         lambda: devices[u].backward(self.down(u, gradients[u])))
                    if reply is not None:
                        norms[u] = self.up(u, reply)
                for u, scale in server.finish(norms, lr).items():
                    self.attempt(u, round_index, step, active, lambda: devices[u].apply(self.down(u, scale), lr))
            slots = len({id(server.slots[u]) for u in participants})
            one_slot_rank = self.global_rank if len(server.unique_slots()) == 1 else None
            done = clock.split_step(groups, self.take_sent(), slots < len(groups), one_slot_rank)
            for u in active:
                self.log_step(round_index, step, u, devices[u].last_loss, devices[u].last_tokens, started, done[u])
            self.step_index += 1

        uploads = []
        for u in list(active):
            upload = self.attempt(u, round_index, 0, active, lambda: self.up(u, devices[u].upload(round_index)))
            if upload is not None:
                slot = server.slots[u]
                full_depth = {**upload.tensors, **get_adapter_state(slot.stage.model, slot.adapter)}
                uploads.append((full_depth, float(upload.values["num_samples"])))
        clock.transfer(self.take_sent(), "up")
        self.require_quorum(round_index, participants, active)
        self.aggregator.aggregate(uploads)

    def memory(self) -> dict[str, int]:
        return {
            "peak_mem_device_bytes": max(d.peak_bytes() for d in self.devices.values()),
            "peak_mem_server_bytes": self.server.peak_bytes(),
            "trainable_params_device": max(d.trainable_params for d in self.devices.values()),
            "trainable_params_server": self.server.trainable_params,
        }

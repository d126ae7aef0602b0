"""What every protocol shares: the global adapter, round sampling, evaluation and step records.

A protocol builds its roles in ``build`` and says in ``train_round`` who sends what to
whom in one round. The engine (``splitfed.run``) drives rounds, evaluation and output.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitfed.adapters.lora import (
    activate,
    add_adapter,
    get_adapter_state,
    lora_layers,
    make_lora_config,
    set_adapter_state,
)
from splitfed.config import RunConfig
from splitfed.data.batches import TokenDataset, iterate_batches
from splitfed.data.partition import FederatedData
from splitfed.models.families import Family, family_for, num_layers
from splitfed.models.split import Stage, StageSpec, position_ids_for, token_loss_sum
from splitfed.optim import lr_at
from splitfed.roles.aggregator import Aggregator
from splitfed.roles.device import Device
from splitfed.runtime.inproc import InProcessLink
from splitfed.runtime.link import message_codec
from splitfed.runtime.remote import DeviceDropped
from splitfed.seeding import derive_seed
from splitfed.system.clock import Clock
from splitfed.wire.messages import Message

GLOBAL_ADAPTER = "global"


class RoundFailed(RuntimeError):
    """Too few devices finished the round; the engine retries it."""


def lora_config(config: RunConfig, family: Family, rank: int, layers: range):
    """The PEFT LoraConfig of an adapter with ``rank`` on ``layers`` (alpha / rank fixed by the config)."""
    lora = config.lora
    return make_lora_config(family, lora.targets, rank, lora.alpha / lora.rank, list(layers), lora.dropout)


@dataclass
class Context:
    config: RunConfig
    model: nn.Module
    """The one frozen base model of this process (all simulated roles share it)."""
    model_dir: str
    """Where the base weights live, for protocols that load extra server-side copies."""
    data: FederatedData
    cuts: list[int]
    """Resolved cut depth per device (split protocols)."""
    log: Callable[[dict], None]
    remote: object | None = None
    """Handles of devices in other processes (``runtime.remote.RemoteDevices``); None: devices run here."""


class Protocol(ABC):
    name: str

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.model = ctx.model
        self.family: Family = family_for(ctx.model.config)
        self.total_layers = num_layers(ctx.model.config)
        if ctx.remote is not None:  # devices are other processes: the transport counts the bytes
            self.link = ctx.remote.link
        else:
            self.link = InProcessLink(message_codec(self.config))
        self.clock = Clock(self.config, ctx.model.config, ctx.cuts)
        self.step_index = 0
        self.total_steps = self.config.train.rounds * self.config.train.local_steps
        ranks = [self.config.device_rank(u) for u in range(self.config.devices.count)]
        # The global adapter is created first under the run seed, so every protocol starts
        # from the same initial LoRA: split and unsplit runs can be compared step by step.
        torch.manual_seed(self.config.seed)
        self.global_rank = max(ranks)
        self.add_adapter(GLOBAL_ADAPTER, self.global_rank, range(self.total_layers))
        self.aggregator = Aggregator(get_adapter_state(self.model, GLOBAL_ADAPTER), self.family)
        self._global_layers = lora_layers(self.model)
        self.devices: dict[int, Device] = {}
        self.dropped: set[int] = set()  # devices that left a round and have not finished one since
        self.build()

    # --- building blocks ------------------------------------------------------------------
    def lora_config(self, rank: int, layers: range):
        return lora_config(self.config, self.family, rank, layers)

    def add_adapter(self, name: str, rank: int, layers: range, model: nn.Module | None = None) -> None:
        add_adapter(model if model is not None else self.model, name, self.lora_config(rank, layers))

    def global_lora_config(self):
        """The PEFT config of the exported global adapter (all layers, the largest rank)."""
        return self.lora_config(self.global_rank, range(self.total_layers))

    def make_device(self, device: int, spec: StageSpec, data: TokenDataset) -> Device:
        if self.ctx.remote is not None:
            return self.ctx.remote.device(device, spec)
        name = f"device{device}"
        self.add_adapter(name, self.config.device_rank(device), spec.layers)
        seed = derive_seed(self.config.seed, 1, device)
        return Device(device, Stage(self.model, spec, self.family), name, data, self.config.train, seed)

    def participants(self, round_index: int) -> list[int]:
        count, chosen = self.config.devices.count, self.config.participants_per_round
        if chosen >= count:
            return list(range(count))
        rng = np.random.default_rng(derive_seed(self.config.seed, 2, round_index))
        return sorted(int(u) for u in rng.choice(count, size=chosen, replace=False))

    def current_lr(self) -> float:
        return lr_at(self.step_index, self.total_steps, self.config.train)

    def up(self, device: int, message: Message) -> Message:
        """Deliver ``message`` from ``device`` to the server side (the link counts its bytes)."""
        return self.link.up(device, message)

    def down(self, device: int, message: Message) -> Message:
        """Deliver ``message`` to ``device`` (the link counts its bytes)."""
        return self.link.down(device, message)

    def take_sent(self) -> dict[tuple[int, str], int]:
        """Bytes per (device, message kind) since the last call: what the simulated clock consumes."""
        return self.link.take_sent()

    def attempt(self, device: int, round_index: int, step: int, active: list[int], action: Callable[[], object]) -> object:
        """Run one exchange with ``device``; if the device is lost, drop it from ``active`` and return None.

        Local devices never drop; remote ones (gRPC, Ray) do when they disconnect, miss their
        deadline or send a message that fails the checks. The drop is recorded in metrics.
        """
        try:
            return action()
        except DeviceDropped as error:
            if device in active:
                active.remove(device)
                self.dropped.add(device)
                self.ctx.log({"kind": "drop", "round": round_index, "step": step, "device": device,
                              "reason": error.reason})
            return None

    def require_quorum(self, round_index: int, participants: list[int], active: list[int]) -> None:
        """Raise RoundFailed unless enough of the round's devices finished it (runtime.quorum);
        record devices that finish a round after having dropped out of an earlier one."""
        needed = max(1, math.ceil(self.config.runtime.quorum * len(participants)))
        if len(active) < needed:
            raise RoundFailed(f"round {round_index}: {len(active)} of {len(participants)} devices finished, "
                              f"runtime.quorum needs {needed}")
        for device in sorted(self.dropped & set(active)):
            self.dropped.discard(device)
            self.ctx.log({"kind": "rejoin", "round": round_index, "device": device})

    def log_step(
        self, round_index: int, step: int, device: int, loss: float, tokens: int, started: float, sim_s: float
    ) -> None:
        """One step record; ``sim_s``: simulated seconds from step start until ``device`` is done."""
        up, down = self.link.take_counts(device)
        self.ctx.log(
            {
                "kind": "step",
                "round": round_index,
                "step": step,
                "device": device,
                "loss": loss,
                "tokens": tokens,
                "bytes_up": up,
                "bytes_down": down,
                "wall_s": time.perf_counter() - started,
                "sim_s": sim_s,
            }
        )

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: TokenDataset) -> float:
        """Mean token loss of the global adapter on the whole (unsplit) model."""
        set_adapter_state(self.model, GLOBAL_ADAPTER, self.aggregator.global_state)
        activate(self._global_layers, [GLOBAL_ADAPTER])
        whole = Stage(self.model, StageSpec(0, self.total_layers, True, True), self.family)
        loss_sum, tokens = 0.0, 0
        for batch in iterate_batches(dataset, self.config.train.eval_batch_size):
            logits = whole(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
            s, n = token_loss_sum(logits, batch.labels)
            loss_sum, tokens = loss_sum + float(s), tokens + n
        return loss_sum / max(tokens, 1)

    # --- what each protocol defines -------------------------------------------------------
    @abstractmethod
    def build(self) -> None:
        """Create the roles (devices, server slots) and their adapters."""

    @abstractmethod
    def train_round(self, round_index: int, participants: list[int]) -> None:
        """Run one round: local steps, then aggregation into ``self.aggregator``."""

    @abstractmethod
    def memory(self) -> dict[str, int]:
        """peak_mem_device_bytes, peak_mem_server_bytes, trainable_params_device/server."""

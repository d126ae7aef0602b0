"""Simulated clock: the time a run would take on the configured devices, server and channel.

The protocols tell the clock what happened (who computed which stage, which bytes crossed
the link, in which order the server served whom); the clock turns it into seconds with
the cost model (FLOPs / FLOP/s, bits / rate). Order of events of one split step, for each
group of devices the server serves together, in serving order:

    device forward (devices in parallel) -> uplink activations -> server forward + backward
    (starts when the group's activations are all in and the server is free) -> downlink
    activation gradient -> device backward -> uplink grad norm -> server steps the slot
    -> downlink clipping factor.

The server is free for the next group once it has sent the gradients, unless the next
group trains the same server-side LoRA (sfl sequential): then it must first step it, which
waits for the devices' grad norms. Local steps are synchronous (a barrier per step); a
round is adapter download + local steps + adapter upload. Fading is drawn once per round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from transformers import PretrainedConfig

from splitfed.config import RunConfig
from splitfed.models.families import num_layers
from splitfed.system.channel import Channel, equal_assignment, split_power
from splitfed.system.costs import Flops, layer_costs, server_memory_bytes, stage_flops, stage_memory
from splitfed.system.profiles import DeviceProfile, population, server_profile
from splitfed.system.traffic import step_bytes

BITS = 8


@dataclass(frozen=True)
class Timing:
    """One device's split step in seconds: head (forward + uplink), server time, tail."""

    head_s: float
    server_s: float
    tail_s: float


class Clock:
    def __init__(self, config: RunConfig, model_config: PretrainedConfig, cuts: list[int]) -> None:
        system = config.system
        self.seed = config.seed if system.seed is None else system.seed
        self.costs = layer_costs(model_config, config.lora.targets)
        self.total_layers = num_layers(model_config)
        self.config = config
        self.cuts = cuts
        self.devices: list[DeviceProfile] = population(config.devices.count, self.seed, system.device_classes)
        self.server = server_profile(system.server)
        subchannels = system.subchannels or max(16, config.participants_per_round)
        self.channel = Channel(subchannels, system.subchannel_hz, system.noise_dbm_per_hz, system.fading)
        self.up_bps: dict[int, float] = {}
        self.down_bps: dict[int, float] = {}
        self.round_s = 0.0
        """Simulated seconds of the current round so far."""

    # --- per round ----------------------------------------------------------------------
    def round_gains(self, round_index: int, participants: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Uplink and downlink channel gains (participants, subchannels) of a round's fading draw."""
        rng = np.random.default_rng([self.seed, 3, round_index])
        distances = [self.devices[u].distance_m for u in participants]
        return self.channel.gains(distances, rng), self.channel.gains(distances, rng)

    def allocation(self, round_index: int, participants: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Subchannel owner (index into ``participants``, -1 unused) and uplink power (watts) per
        subchannel: the configured plan's row for this round, else equal subchannels and power."""
        system = self.config.system
        max_power = np.array([self.devices[u].max_power_w for u in participants])
        if not system.subchannel_owner:
            assignment = equal_assignment(len(participants), self.channel.subchannels)
            return assignment, split_power(assignment, max_power)
        index = {u: i for i, u in enumerate(participants)}
        owners = system.subchannel_owner[round_index % len(system.subchannel_owner)]
        assignment = np.array([index.get(u, -1) for u in owners], dtype=int)
        if not system.power_w:
            return assignment, split_power(assignment, max_power)
        power = np.array(system.power_w[round_index % len(system.power_w)], dtype=float)
        power[assignment < 0] = 0.0
        totals = np.bincount(assignment[assignment >= 0], weights=power[assignment >= 0], minlength=len(participants))
        for i, u in enumerate(participants):
            if totals[i] > max_power[i] * (1 + 1e-9):
                raise ValueError(
                    f"system.power_w: device {u} ({self.devices[u].name}) transmits {totals[i]:.4g} W in round "
                    f"{round_index}, above its maximum {max_power[i]:.4g} W"
                )
        return assignment, power

    def begin_round(self, round_index: int, participants: list[int]) -> None:
        """Draw this round's fading and give the participants their subchannels and power."""
        up_gains, down_gains = self.round_gains(round_index, participants)
        assignment, up_power = self.allocation(round_index, participants)
        down_power = np.full(self.channel.subchannels, self.server.power_w / self.channel.subchannels)
        up = self.channel.rates(up_gains, assignment, up_power)
        down = self.channel.rates(down_gains, assignment, down_power)
        for i, u in enumerate(participants):
            if up[i] <= 0 or down[i] <= 0:
                raise ValueError(
                    f"device {u} ({self.devices[u].name}) gets no rate: check its power, distance and subchannels"
                )
            self.up_bps[u], self.down_bps[u] = float(up[i]), float(down[i])
        self.round_s = 0.0

    def transfer(self, sent: Mapping[tuple[int, str], int], direction: str) -> None:
        """Adapter downloads (``"down"``) or uploads (``"up"``) of a round, devices in parallel."""
        seconds = self.down_s if direction == "down" else self.up_s
        totals: dict[int, int] = {}
        for (u, _), nbytes in sent.items():
            totals[u] = totals.get(u, 0) + nbytes
        self.round_s += max((seconds(u, n) for u, n in totals.items()), default=0.0)

    # --- costs --------------------------------------------------------------------------
    def up_s(self, device: int, nbytes: float) -> float:
        return nbytes * BITS / self.up_bps[device]

    def down_s(self, device: int, nbytes: float) -> float:
        return nbytes * BITS / self.down_bps[device]

    def _batch(self) -> tuple[int, int]:
        return self.config.train.batch_size, self.config.train.seq_len

    def device_flops(self, device: int) -> Flops:
        """FLOPs of one step of the device's stage (the whole model when it holds no cut)."""
        batch, seq = self._batch()
        rank = self.config.device_rank(device)
        if not self.cuts:
            return stage_flops(self.costs, self.total_layers, batch, seq, rank, first=True, last=True)
        return stage_flops(self.costs, self.cuts[device], batch, seq, rank, first=True, last=False)

    def server_s(self, devices: list[int], rank: int | None = None) -> float:
        """Server forward + backward for the batches of ``devices`` (rank: of the slot, default per device)."""
        batch, seq = self._batch()
        flops = sum(
            stage_flops(
                self.costs, self.total_layers - self.cuts[u], batch, seq,
                rank or self.config.device_rank(u), first=False, last=True,
            ).total
            for u in devices
        )
        return flops / self.server.flops

    def step_bytes(self, device: int) -> dict[str, int]:
        """Predicted encoded bytes of each message kind of one split step of ``device``."""
        compression = self.config.compression
        return step_bytes(
            self.costs, device, *self._batch(),
            compression.pipeline_spec("activations", device), compression.pipeline_spec("gradients", device),
            exact=True,
        )

    def timing(self, device: int) -> Timing:
        """Predicted split-step timing of a device from the cost model (for the schedulers)."""
        flops = self.device_flops(device)
        sizes = self.step_bytes(device)
        speed = self.devices[device].flops
        return Timing(
            head_s=flops.forward / speed + self.up_s(device, sizes["activations"]),
            server_s=self.server_s([device]),
            tail_s=self.down_s(device, sizes["activation_grad"]) + flops.backward / speed,
        )

    # --- steps --------------------------------------------------------------------------
    def split_step(
        self, groups: list[list[int]], sent: Mapping[tuple[int, str], int], shared_slot: bool, slot_rank: int | None = None
    ) -> dict[int, float]:
        """Seconds from step start until each device has applied its update; advances the round.

        ``sent``: bytes per (device, message kind) the link counted in this step; a kind missing
        for a device (it dropped out during the step) counts as nothing sent.
        """
        free, done_at = 0.0, {}
        for group in groups:
            flops = {u: self.device_flops(u) for u in group}
            speed = {u: self.devices[u].flops for u in group}
            arrived = max(flops[u].forward / speed[u] + self.up_s(u, sent.get((u, "activations"), 0)) for u in group)
            computed = max(free, arrived) + self.server_s(group, slot_rank)
            norms_in = {
                u: computed + self.down_s(u, sent.get((u, "activation_grad"), 0)) + flops[u].backward / speed[u]
                + self.up_s(u, sent.get((u, "grad_norm"), 0))
                for u in group
            }
            stepped = max(norms_in.values())
            done_at.update({u: stepped + self.down_s(u, sent.get((u, "clip_scale"), 0)) for u in group})
            free = stepped if shared_slot else computed
        self.round_s += max(done_at.values(), default=0.0)  # no devices left: nothing happened
        return done_at

    def local_step(self, devices: list[int], on_server: bool) -> dict[int, float]:
        """Whole-model steps, in parallel on the devices (or on the server: centralized)."""
        seconds = {
            u: self.device_flops(u).total / (self.server.flops if on_server else self.devices[u].flops) for u in devices
        }
        self.round_s += max(seconds.values(), default=0.0)
        return seconds


def predicted_memory(config: RunConfig, model_config: PretrainedConfig, cuts: list[int]) -> dict[str, int]:
    """Predicted peak bytes of the largest device and of the server for a run of ``config``."""
    costs = layer_costs(model_config, config.lora.targets)
    total = num_layers(model_config)
    batch, seq = config.train.batch_size, config.train.seq_len
    ranks = [config.device_rank(u) for u in range(config.devices.count)]
    if not cuts:
        device = max(stage_memory(costs, total, r, batch, seq, first=True, last=True).total for r in ranks)
        return {"peak_mem_device_bytes": int(device), "peak_mem_server_bytes": 0}
    device = max(stage_memory(costs, cut, r, batch, seq, first=True, last=False).total for cut, r in zip(cuts, ranks))
    if config.protocol == "sfl":
        together = config.participants_per_round if config.server.mode == "parallel" else 1
        slots, copies, parallel = [(cuts[0], max(ranks), batch * together)], False, True
    else:  # memsfl: one base, one device at a time; sflv1: a copy per device, in parallel
        parallel = copies = config.protocol == "sflv1"
        slots = [(cut, r, batch) for cut, r in zip(cuts, ranks)]
    server = server_memory_bytes(costs, total, slots, seq, copies=copies, parallel=parallel)
    return {"peak_mem_device_bytes": int(device), "peak_mem_server_bytes": server}

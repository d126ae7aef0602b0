"""Simulated clock: the time a run would take on the configured devices, server and channel.

The clock reads the run's topology (routes of stages over hops, ``splitfed.topology``) and
is told what happened (which bytes crossed which hop, which groups were served in which
order); it turns that into seconds with the cost model (FLOPs / FLOP/s, bits / rate). A
device's access hop is priced by the wireless channel, a hop between two server-side
workers by the wired backhaul (``system.backhaul_gbps``). Order of events of one split step,
for each group of routes served together, in serving order:

    first-stage forward (devices in parallel) -> uplink activations -> later stages forward,
    each after the previous hop (the last also computes the loss and its backward; it starts
    when the group's activations are all in and the server side is free) -> middle stages'
    backward -> downlink activation gradient -> device backward -> uplink grad norm -> the
    server-side slots step -> downlink clipping factor.

Stages of one step index on different workers run in parallel; slots of one worker share it.

The server is free for the next group once it has sent the gradients, unless the next
group trains the same server-side LoRA (sfl sequential): then it must first step it, which
waits for the devices' grad norms. Local steps are synchronous (a barrier per step); a
round is adapter download + local steps + adapter upload. Fading is drawn once per round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from transformers import PretrainedConfig

from splitfed.config import RunConfig
from splitfed.models.families import num_layers
from splitfed.system.channel import Channel, equal_assignment, split_power
from splitfed.system.costs import Flops, head_flops, layer_costs, server_memory_bytes, stage_flops, stage_memory
from splitfed.system.profiles import DeviceProfile, ServerProfile, population, server_profile
from splitfed.system.traffic import step_bytes
from splitfed.topology import StagePlacement, Topology

BITS = 8


@dataclass(frozen=True)
class Timing:
    """One device's split step in seconds: head (forward + uplink), server time, tail."""

    head_s: float
    server_s: float
    tail_s: float


class Clock:
    def __init__(self, config: RunConfig, model_config: PretrainedConfig, topology: Topology) -> None:
        system = config.system
        self.seed = config.seed if system.seed is None else system.seed
        self.costs = layer_costs(model_config, config.lora.targets)
        self.total_layers = num_layers(model_config)
        self.config = config
        self.topology = topology
        self.routes = topology.routes
        self._device_of = {route.first.worker: route.device for route in self.routes}
        self.devices: list[DeviceProfile] = population(config.devices.count, self.seed, system.device_classes)
        if config.devices.tflops:  # the config's compute budgets replace the drawn speeds
            self.devices = [replace(d, flops=config.device_tflops(u) * 1e12, head_flops=None)
                            for u, d in enumerate(self.devices)]
        self.server = server_profile(system.server)
        self.edge = server_profile(system.edge)
        self.backhaul_bps = system.backhaul_gbps * 1e9
        self.backhaul_latency_s = system.backhaul_latency_ms / 1e3
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

    def transfer(self, sent: Mapping[tuple[int, str, str], int]) -> None:
        """Adapter downloads or uploads of a round: every hop in parallel."""
        totals: dict[str, int] = {}
        for (_, hop, _), nbytes in sent.items():
            totals[hop] = totals.get(hop, 0) + nbytes
        self.round_s += max((self.hop_s(hop, n) for hop, n in totals.items()), default=0.0)

    # --- costs --------------------------------------------------------------------------
    def hop_s(self, hop: str, nbytes: float) -> float:
        """Seconds to send ``nbytes`` over hop ``"src->dst"``: a device's wireless link, else the backhaul."""
        src, dst = hop.split("->", 1)
        if src in self._device_of:
            return self.up_s(self._device_of[src], nbytes)
        if dst in self._device_of:
            return self.down_s(self._device_of[dst], nbytes)
        return self.backhaul_latency_s + nbytes * BITS / self.backhaul_bps if nbytes else 0.0

    def up_s(self, device: int, nbytes: float) -> float:
        return nbytes * BITS / self.up_bps[device]

    def down_s(self, device: int, nbytes: float) -> float:
        return nbytes * BITS / self.down_bps[device]

    def _batch(self) -> tuple[int, int]:
        return self.config.train.batch_size, self.config.train.seq_len

    def stage_flops(self, stage: StagePlacement) -> Flops:
        """FLOPs of one step of one route's batch through ``stage``."""
        batch, seq = self._batch()
        return stage_flops(self.costs, stage.end - stage.start, batch, seq, stage.rank, stage.first, stage.last)

    def machine(self, stage: StagePlacement, device: int) -> DeviceProfile | ServerProfile:
        """The machine that runs ``stage`` of ``device``'s route."""
        if stage.tier == "device":
            return self.devices[device]
        return self.edge if stage.tier == "edge" else self.server

    def stage_s(self, stage: StagePlacement, device: int) -> tuple[float, float]:
        """(forward, backward) seconds of one step of ``device``'s batch through ``stage``: the layers at
        the machine's FLOP/s, a last stage's LM head at its head FLOP/s (measured profiles have one)."""
        flops, machine = self.stage_flops(stage), self.machine(stage, device)
        if not stage.last or machine.head_flops is None:
            return flops.forward / machine.flops, flops.backward / machine.flops
        batch, seq = self._batch()
        head = head_flops(self.costs, batch, seq)
        return ((flops.forward - head.forward) / machine.flops + head.forward / machine.head_flops,
                (flops.backward - head.backward) / machine.flops + head.backward / machine.head_flops)

    def device_s(self, device: int) -> tuple[float, float]:
        """(forward, backward) seconds of one step of the device's first stage (the whole model when it
        holds no cut)."""
        return self.stage_s(self.routes[device].first, device)

    def _stage_s(self, devices: list[int], k: int, part: str) -> float:
        """Seconds of stage ``k`` (``forward``, ``backward`` or ``total``) for the routes of ``devices``:
        workers in parallel, the routes of one worker one after another."""
        per_worker: dict[str, float] = {}
        for u in devices:
            stages = self.routes[u].stages
            if k < len(stages):
                stage = stages[k]
                forward, backward = self.stage_s(stage, u)
                seconds = {"forward": forward, "backward": backward, "total": forward + backward}[part]
                per_worker[stage.worker] = per_worker.get(stage.worker, 0.0) + seconds
        return max(per_worker.values(), default=0.0)

    def _hop_step_s(self, devices: list[int], k: int, kind: str, sent: Mapping[tuple[int, str, str], int],
                    reverse: bool = False) -> float:
        """Seconds to carry ``kind`` over the hops stage k -> k + 1 (reversed: back) of ``devices``' routes."""
        totals: dict[str, int] = {}
        for u in devices:
            hops = self.routes[u].hops
            if k < len(hops):
                hop = hops[k].reverse() if reverse else hops[k]
                totals[hop.name] = totals.get(hop.name, 0) + sent.get((u, hop.name, kind), 0)
        return max((self.hop_s(hop, n) for hop, n in totals.items()), default=0.0)

    def server_s(self, devices: list[int], sent: Mapping[tuple[int, str, str], int] | None = None) -> float:
        """Seconds the server side needs for the batches of ``devices``: the stages after the first
        forward up the route, the last stage's forward and backward, backward down again, and the
        backhaul hops between server-side stages (bytes as counted in ``sent``, else predicted)."""
        depth = max(len(self.routes[u].stages) for u in devices)
        sent = self._predicted_hop_bytes(devices) if sent is None and depth > 2 else sent or {}
        seconds = self._stage_s(devices, depth - 1, "total")
        for k in range(1, depth - 1):  # middle stages: forward + backward, and the hop to the next stage
            seconds += self._stage_s(devices, k, "total") + self._hop_step_s(devices, k, "activations", sent)
            seconds += self._hop_step_s(devices, k, "activation_grad", sent, reverse=True)
        return seconds

    def _predicted_hop_bytes(self, devices: list[int]) -> dict[tuple[int, str, str], int]:
        """Uncompressed activations and gradients on the server-side hops of ``devices``' routes."""
        sent = {}
        for u in devices:
            sizes = step_bytes(self.costs, u, *self._batch())
            for hop in self.routes[u].hops[1:]:
                sent[(u, hop.name, "activations")] = sizes["activations"]
                sent[(u, hop.reverse().name, "activation_grad")] = sizes["activation_grad"]
        return sent

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
        forward, backward = self.device_s(device)
        sizes = self.step_bytes(device)
        return Timing(
            head_s=forward + self.up_s(device, sizes["activations"]),
            server_s=self.server_s([device]),
            tail_s=self.down_s(device, sizes["activation_grad"]) + backward,
        )

    # --- steps --------------------------------------------------------------------------
    def split_step(
        self, groups: list[list[int]], sent: Mapping[tuple[int, str, str], int], shared_slot: bool
    ) -> dict[int, float]:
        """Seconds from step start until each device has applied its update; advances the round.

        ``sent``: bytes per (route, hop, message kind) the links counted in this step; a kind
        missing for a route (it dropped out during the step) counts as nothing sent.
        ``shared_slot``: consecutive groups train a common server-side slot, so the next group
        waits until that slot has stepped.
        """
        free, done_at = 0.0, {}
        for group in filter(None, groups):  # a group whose devices all left before the step has no time
            compute = {u: self.device_s(u) for u in group}  # (forward, backward) seconds
            up = {u: self.routes[u].hops[0].name for u in group}
            down = {u: self.routes[u].hops[0].reverse().name for u in group}
            arrived = max(compute[u][0] + self.up_s(u, sent.get((u, up[u], "activations"), 0)) for u in group)
            computed = max(free, arrived) + self.server_s(group, sent)
            norms_in = {
                u: computed + self.down_s(u, sent.get((u, down[u], "activation_grad"), 0))
                + compute[u][1] + self.up_s(u, sent.get((u, up[u], "grad_norm"), 0))
                for u in group
            }
            stepped = max(norms_in.values())
            done_at.update({u: stepped + self.down_s(u, sent.get((u, down[u], "clip_scale"), 0)) for u in group})
            free = stepped if shared_slot else computed
        self.round_s += max(done_at.values(), default=0.0)  # no devices left: nothing happened
        return done_at

    def local_step(self, devices: list[int]) -> dict[int, float]:
        """Whole-model steps, in parallel on the machines that run them."""
        seconds = {u: sum(self.device_s(u)) for u in devices}
        self.round_s += max(seconds.values(), default=0.0)
        return seconds


def predicted_memory(
    config: RunConfig, model_config: PretrainedConfig, topology: Topology, together: bool, per_round: int
) -> dict[str, int]:
    """Predicted peak bytes of the largest first-stage worker and of the largest server-side worker.

    ``together``: the routes of a round are served as one group (slots' activations coexist,
    a shared slot trains on all of the round's batches at once); else one at a time.
    ``per_round``: routes that train in one round.
    """
    costs = layer_costs(model_config, config.lora.targets)
    total = num_layers(model_config)
    batch, seq = config.train.batch_size, config.train.seq_len
    firsts = {"device": [0.0], "server": [0.0]}
    for r in topology.routes:
        stage = r.first
        firsts.setdefault(stage.tier, [0.0]).append(
            stage_memory(costs, stage.end - stage.start, stage.rank, batch, seq, True, stage.last).total)
    device = max(firsts["device"])
    servers = [int(m) for m in firsts["server"]]
    first_workers = {r.first.worker for r in topology.routes}
    for worker, slots in topology.workers().items():
        if worker in first_workers or not all(s.last for s in slots):
            continue  # middle stages are measured, not predicted
        sized = [(s.start, s.rank, batch * (min(len(topology.routes_of(s.key)), per_round) if together else 1))
                 for s in slots]
        copies = len({s.base for s in slots}) > 1
        servers.append(server_memory_bytes(costs, total, sized, seq, copies=copies, parallel=together))
    return {"peak_mem_device_bytes": int(device), "peak_mem_server_bytes": max(servers)}

"""What every protocol shares: its declarations, the workers built from them, the global
adapter, round sampling, evaluation and step records.

A protocol is one file. It declares, without loading any weights:
- ``Options``: its own config section (``[<name>]`` in the TOML file), and ``check_config``;
- ``topology``: each device's route of stages over workers (``splitfed.topology``);
- ``serves_together`` / ``groups``: which routes the server side serves together, in which order;
and it says in ``train_round`` who sends what to whom in one round. Everything else
(workers, checkpoints, memory report, clock, planner predictions, process hosting) is
derived here and in the engine (``splitfed.run``) from those declarations.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from splitfed.adapters.aggregate import Upload
from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.merge import apply_merges, merge_shapes, merged_versions
from splitfed.adapters.pool import AdapterPool
from splitfed.adapters.lora import activate, add_adapter, get_adapter_state, layout_config, lora_layers, set_adapter_state
from splitfed.config import ProtocolOptions, RunConfig
from splitfed.data.batches import TokenDataset, iterate_batches
from splitfed.data.partition import FederatedData
from splitfed.models.families import Family, family_for, num_layers
from splitfed.models.loading import load_model, load_stage_model
from splitfed.models.split import Stage, StageSpec, position_ids_for, token_loss_sum
from splitfed.optim import lr_at
from splitfed.roles.aggregator import Aggregator
from splitfed.roles.worker import StageWorker
from splitfed.runtime.futures import Reply
from splitfed.runtime.handles import LocalWorker, Network, WorkerHandle
from splitfed.runtime.inproc import InProcessLink
from splitfed.runtime.link import message_codec
from splitfed.runtime.remote import DeviceDropped, RemoteDevices
from splitfed.seeding import Purpose, derive_seed
from splitfed.system.clock import Clock, predicted_memory
from splitfed.system.cuts import resolve_cuts
from splitfed.system.schedule import serving_order
from splitfed.topology import EDGE_TIER, NO_ROUTE, Hop, StagePlacement, Topology, edge_peers
from splitfed.wire.messages import Message

GLOBAL_ADAPTER = "global"


def adapter_layout(config: RunConfig, stage: StagePlacement) -> AdapterLayout:
    """The LoRA layout of a stage's slot: its layers, the configured targets, the stage's rank."""
    lora = config.lora
    return AdapterLayout(stage.layers, tuple(lora.targets), stage.rank, lora.alpha / lora.rank, stage.placement)


def adapter_pool(config: RunConfig, family: Family) -> AdapterPool:
    """The pool of adapters one process's slots share (``runtime.adapter_slots``)."""
    return AdapterPool(family, config.lora.dropout, reuse=config.runtime.adapter_slots == "pool")


class RoundFailed(RuntimeError):
    """Too few devices finished the round; the engine retries it."""


@dataclass
class Context:
    config: RunConfig
    model: nn.Module
    """The frozen base model of this process on the aggregator's device (``compute.server``, or ``compute.cloud``):
    every simulated worker placed on that device shares it, and it serves the evaluation and the export."""
    model_dir: str
    """Where the base weights live, for slots that run on their own copy of the base."""
    data: FederatedData
    cuts: list[int]
    """Resolved cut depth per device (split protocols)."""
    log: Callable[[dict], None]
    remote: RemoteDevices | None = None
    """Devices in other processes (gRPC, Ray); None: every worker runs here."""


class Protocol(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[ProtocolOptions]] = ProtocolOptions
    split: ClassVar[bool] = True
    """Devices hold a cut (``devices.cuts`` or ``devices.memory_mb`` decide it)."""
    common_cut: ClassVar[bool] = False
    """Every device has the same cut (a shared server-side stage starts right above it)."""
    per_device_cuts: ClassVar[str | None] = None
    """The protocol a planner switches to when it gives this protocol's devices different cuts."""

    # --- declarations (no weights needed: the config checks, clock and planners use them) ----
    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        """Raise ValueError (naming the field) for configs this protocol cannot run."""
        if cls.split and not (config.devices.cuts or config.devices.memory_mb):
            raise ValueError(f"protocol {cls.name!r} needs devices.cuts or devices.memory_mb")
        if cls.common_cut and len(set(config.devices.cuts)) > 1:
            raise ValueError(f"protocol {cls.name!r} uses one cut for all devices; devices.cuts={config.devices.cuts}")

    @classmethod
    def resolve_cuts(cls, config: RunConfig, model_config: PretrainedConfig) -> list[int]:
        return resolve_cuts(config, model_config, common=cls.common_cut) if cls.split else []

    @classmethod
    @abstractmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        """Every device's route."""

    @classmethod
    def largest_rank(cls, config: RunConfig) -> int:
        """The largest LoRA rank any slot may train (it bounds the rank of a merge: devices x this)."""
        return max([config.lora.rank, *config.devices.ranks])

    @classmethod
    def serves_together(cls, config: RunConfig) -> bool:
        """The server side serves all routes of a step as one group (else one route at a time)."""
        return True

    @classmethod
    def scheduled(cls, config: RunConfig) -> bool:
        """One route at a time in the order of a scheduler (``system.schedule``) on predicted timings."""
        return False

    @classmethod
    def scheduler(cls, config: RunConfig) -> str:
        return "fifo"

    @classmethod
    def routes_per_round(cls, config: RunConfig) -> int:
        """How many routes train in one round."""
        return config.participants_per_round

    @classmethod
    def predicted_memory(cls, config: RunConfig, model_config: PretrainedConfig, cuts: list[int]) -> dict[str, int]:
        """Predicted peak bytes of the largest device and server-side worker (``system.clock``)."""
        topology = cls.topology(config, cuts, num_layers(model_config))
        return predicted_memory(config, model_config, topology, cls.serves_together(config), cls.routes_per_round(config))

    @classmethod
    def groups(cls, config: RunConfig, clock: Clock, participants: list[int], step_index: int) -> list[list[int]]:
        """Routes the server side serves together, in serving order."""
        if cls.scheduled(config):  # one at a time, in the scheduler's order
            order = serving_order(clock, participants, cls.scheduler(config), config.seed, step_index)
            return [[u] for u in order]
        return [participants] if cls.serves_together(config) else [[u] for u in participants]

    # --- building the workers ----------------------------------------------------------------
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.model = ctx.model
        self._models = {ctx.model.get_input_embeddings().weight.device: ctx.model}
        """The base model on each torch device simulated workers of this process run on (``compute``)."""
        self.family: Family = family_for(ctx.model.config)
        self.total_layers = num_layers(ctx.model.config)
        self.topo = type(self).topology(self.config, ctx.cuts, self.total_layers)
        self.link = InProcessLink(message_codec(self.config))
        remote = self._remote_workers()
        self.net = Network(self.topo, self.link, set(remote))
        self.clock = Clock(self.config, ctx.model.config, self.topo)
        self.step_index = 0
        self.total_steps = self.config.train.rounds * self.config.train.local_steps
        # The global adapter is created first under the run seed, so every protocol starts
        # from the same initial LoRA: split and unsplit runs can be compared step by step.
        torch.manual_seed(self.config.seed)
        self.global_rank = max(s.rank for r in self.topo.routes for s in r.stages)
        lora = self.config.lora
        self.global_layout = AdapterLayout(range(self.total_layers), tuple(lora.targets), self.global_rank,
                                           lora.alpha / lora.rank)
        """The exported global adapter: every layer at the largest rank of any stage."""
        add_adapter(self.model, GLOBAL_ADAPTER, layout_config(self.family, self.global_layout, lora.dropout))
        self.aggregator = Aggregator(get_adapter_state(self.model, GLOBAL_ADAPTER), self.family,
                                     self.config.aggregation.method, lora.alpha / lora.rank, self.config.seed)
        self.merged: dict[tuple[str, str], int] = {}
        """Per slot (worker, slot): how many of the aggregator's merges it has been sent."""
        self._global_layers = lora_layers(self.model)
        self.pool = adapter_pool(self.config, self.family)
        """The adapters this process's slots take turns on (``adapters.pool``)."""
        self.workers: dict[str, WorkerHandle] = {**self._local_workers(set(remote)), **remote}
        self.dropped: set[int] = set()  # devices that left a round and have not finished one since

    def layout_of(self, stage: StagePlacement) -> AdapterLayout:
        return adapter_layout(self.config, stage)

    def dataset(self, device: int) -> TokenDataset:
        """Training data of device ``device``'s first stage."""
        return self.ctx.data.train[device]

    def _remote_workers(self) -> dict[str, WorkerHandle]:
        """Handles of the workers in other processes: every device, and every edge (``topology.EDGE_TIER``)
        with the devices behind it."""
        remote = self.ctx.remote
        if remote is None:
            return {}
        handles: dict[str, WorkerHandle] = {}
        for route in self.topo.routes:
            name = route.first.worker
            aggregator_hop = Hop(name, self.topo.aggregator)
            hop = route.hops[0] if route.hops else aggregator_hop
            relayed = len(route.stages) > 1 and route.stages[1].tier == EDGE_TIER
            handle = remote.handle(route.device, name, hop, aggregator_hop, self.link, relayed=relayed)
            handle.bounds = replace(handle.bounds, merge_modules=self._merge_modules(route.first))
            handles[name] = handle
        streams: dict[str, dict[str, tuple[int, int, int]]] = {}
        for (worker, slot), peer in edge_peers(self.topo).items():
            key = (worker, slot)
            max_batch = self.config.train.batch_size * len(self.topo.routes_of(key))
            streams.setdefault(worker, {})[slot] = (peer, self.topo.owner(key), max_batch)
        for worker, slots in streams.items():
            handles[worker] = remote.stage(worker, slots, self.topo, self.link)
            for slot, stream in handles[worker].slots.items():
                stage = next(s for s in self.topo.workers()[worker] if s.slot == slot)
                stream.bounds = replace(stream.bounds, merge_modules=self._merge_modules(stage))
        return handles

    def _merge_modules(self, stage: StagePlacement) -> dict[str, tuple[int, int]]:
        """The weight matrices of a stage's layers: what its merges and importance reports may name."""
        return merge_shapes(self.model, self.family, stage.layers, self.config.lora.targets)

    def _local_workers(self, remote: set[str]) -> dict[str, WorkerHandle]:
        copies: dict[str, nn.Module] = {}
        handles: dict[str, WorkerHandle] = {}
        first_of = {r.first.key: r.device for r in self.topo.routes}
        for name, slots in self.topo.workers().items():
            if name in remote:
                continue
            worker = StageWorker(name, self.config.train, self.pool)
            for placement in slots:
                spec = StageSpec(placement.start, placement.end, placement.first, placement.last)
                placed_on = self.config.compute.torch_device(placement.tier)
                model = self.model_on(placed_on)
                if placement.base:  # a slot on its own copy of the base weights (loaded once per label)
                    if placement.base not in copies:
                        copies[placement.base] = load_stage_model(self.ctx.model_dir, spec,
                                                                  self.config.compute.torch_dtype, placed_on)
                    model = copies[placement.base]
                device = first_of.get(placement.key)
                data = self.dataset(device) if placement.first and device is not None else None
                seed = derive_seed(self.config.seed, Purpose.BATCHES, device) if device is not None else None
                worker.add_slot(placement.slot, Stage(model, spec, self.family), self.layout_of(placement), data, seed)
            handles[name] = LocalWorker(worker)
        return handles

    def model_on(self, device: torch.device) -> nn.Module:
        """The base model on ``device`` (loaded once per device: simulated roles placed on another
        device than the aggregator's share a second copy)."""
        if device not in self._models:
            self._models[device] = load_model(self.config.model.source, self.config.compute.torch_dtype, device)
        return self._models[device]

    # --- building blocks of rounds ---------------------------------------------------------
    def first(self, device: int) -> tuple[WorkerHandle, StagePlacement]:
        """The handle and placement of device ``device``'s first stage."""
        stage = self.topo.routes[device].first
        return self.workers[stage.worker], stage

    def participants(self, round_index: int) -> list[int]:
        count, chosen = self.config.devices.count, self.config.participants_per_round
        if chosen >= count:
            return list(range(count))
        rng = np.random.default_rng(derive_seed(self.config.seed, Purpose.PARTICIPANTS, round_index))
        return sorted(int(u) for u in rng.choice(count, size=chosen, replace=False))

    def current_lr(self) -> float:
        return lr_at(self.step_index, self.total_steps, self.config.train)

    def take_sent(self) -> dict[tuple[int, str, str], int]:
        """Bytes per (route, hop, message kind) since the last call: what the simulated clock consumes."""
        return self.link.take_sent()

    def attempt(self, device: int, round_index: int, step: int, active: list[int], reply: Callable[[], object],
                routes: list[int] | None = None) -> object:
        """Wait for one exchange with ``device``; if the device is lost, drop it (or ``routes``: every route
        through a lost slot) from ``active`` and return None.

        Local workers never drop; remote ones (gRPC, Ray) do when they disconnect, miss their
        deadline or send a message that fails the checks. The drop is recorded in metrics.
        """
        try:
            return reply()
        except DeviceDropped as error:
            for u in routes if routes is not None else [device]:
                self.drop(u, round_index, step, active, error.reason)
            return None

    def drop(self, device: int, round_index: int, step: int, active: list[int], reason: str) -> None:
        """Take ``device``'s route out of the round (recorded in metrics)."""
        if device in active:
            active.remove(device)
            self.dropped.add(device)
            self.ctx.log({"kind": "drop", "round": round_index, "step": step, "device": device, "reason": reason})

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

    def log_step(self, round_index: int, step: int, device: int, loss: float, tokens: int, started: float,
                 sim_s: float) -> None:
        """One step record; ``sim_s``: simulated seconds from step start until ``device`` is done."""
        up, down, hops = self.link.take_counts(device)
        record = {"kind": "step", "round": round_index, "step": step, "device": device, "loss": loss,
                  "tokens": tokens, "bytes_up": up, "bytes_down": down,
                  "wall_s": time.perf_counter() - started, "sim_s": sim_s}
        if len(self.topo.routes[device].hops) > 1:
            record["bytes_by_hop"] = hops
        self.ctx.log(record)

    # --- federation: adapters down at round start, up at round end ---------------------------
    def _slots_of(self, devices: list[int]) -> list[StagePlacement]:
        """The distinct slots the routes of ``devices`` pass, first stages first."""
        seen: dict[tuple[str, str], StagePlacement] = {}
        for depth in range(self.topo.depth()):
            for u in devices:
                stages = self.topo.routes[u].stages
                if depth < len(stages):
                    seen.setdefault(stages[depth].key, stages[depth])
        return list(seen.values())

    def download_adapters(self, round_index: int, participants: list[int], active: list[int]) -> None:
        """Every slot the round's routes pass loads its part of the global adapter; with a merging
        aggregation it first merges into its base the merges it has not had (``adapters.merge``)."""
        replies: list[tuple[int, Reply]] = []
        merged: dict[tuple[str, str], int] = {}
        version = self.aggregator.version
        for stage in self._slots_of(participants):
            hop, owner = Hop(self.topo.aggregator, stage.worker), self.topo.owner(stage.key)
            # a device that dropped may come back as a fresh process: send it every merge (a base that holds them skips them)
            since = 0 if self.topo.owner(stage.key) in self.dropped else self.merged.get(stage.key, 0)
            if since < version:
                merges = self.aggregator.merges_for(stage.layers, since)
                message = Message("adapter_merge", "aggregator", round_index, 0, merges,
                                  {"since": since, "version": version})
                delivered = self.net.carry(hop, owner, "down", message)
                replies.append((owner, self.workers[stage.worker].merge(stage.slot, delivered)))
                merged[stage.key] = version
            state = self.aggregator.download_for(self.layout_of(stage))
            message = Message("adapter_download", "aggregator", round_index, 0, state)
            delivered = self.net.carry(hop, owner, "down", message)
            replies.append((owner, self.workers[stage.worker].download(stage.slot, delivered)))
        for owner, reply in replies:
            self.attempt(owner, round_index, 0, active, reply.result)
        for key, version in merged.items():  # a slot whose device dropped is sent its merges again
            if self.topo.owner(key) in active or self.topo.owner(key) == NO_ROUTE:
                self.merged[key] = version

    def aggregate(self, uploads: list[Upload]) -> None:
        """Combine the round's uploads; a merge also goes into this process's base model at once
        (the global adapter the evaluation and the export use sits on it)."""
        self.aggregator.aggregate(uploads)
        if self.aggregator.strategy.merges:
            self.merge_local()

    def merge_local(self) -> None:
        """Bring every layer of this process's base model to the aggregator's merges (only those it lacks)."""
        layers = range(self.total_layers)
        since = min(merged_versions(self.model).get(layer, 0) for layer in layers)
        apply_merges(self.model, self.aggregator.merges_for(layers, since), self.family, layers, since,
                     self.aggregator.version)

    def upload_adapters(self, round_index: int, active: list[int]) -> list[Upload]:
        """Every slot the finishing routes passed sends its adapter; each route's full-depth
        adapter (its slots joined) is one upload, weighted by its device's samples."""
        slots = self._slots_of(active)
        replies = {stage.key: self.workers[stage.worker].upload(stage.slot, round_index) for stage in slots}
        states: dict[tuple[str, str], dict] = {}
        weights: dict[int, float] = {}
        for stage in slots:
            owner = self.topo.owner(stage.key)
            message = self.attempt(owner, round_index, 0, active, replies[stage.key].result,
                                   routes=[u for u in self.topo.routes_of(stage.key) if u in active])
            if message is None:
                continue
            message = self.net.carry(Hop(stage.worker, self.topo.aggregator), owner, "up", message)
            states[stage.key] = message.tensors
            if stage.first:
                weights[self.topo.routes_of(stage.key)[0]] = float(message.values["num_samples"])
        uploads = []
        for u in active:
            stages = self.topo.routes[u].stages
            if u not in weights or any(s.key not in states for s in stages):
                continue
            full_depth = {k: v for s in stages for k, v in states[s.key].items()}
            layout = replace(self.global_layout, layers=range(stages[-1].end), rank=max(s.rank for s in stages))
            uploads.append(Upload(full_depth, layout, weights[u]))
        return uploads

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

    def global_lora_config(self):
        """The PEFT config of the exported global adapter (all layers, the largest rank)."""
        return layout_config(self.family, self.global_layout, self.config.lora.dropout)

    # --- the memory report ----------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """Per tier: the peak bytes and trainable parameters of its largest worker. Tiers beyond the
        device (edge, cloud) also count as server side: ``peak_mem_server_bytes`` is the most loaded
        server-side worker, ``peak_mem_server_total_bytes`` the sum over all of them (each on its machine)."""
        report = {f"{key}_{tier}{suffix}": 0 for tier in ("device", "server")
                  for key, suffix in (("peak_mem", "_bytes"), ("trainable_params", ""))}
        report["peak_mem_server_total_bytes"] = 0
        for name, handle in self.workers.items():
            peak, params = handle.peak_bytes(), handle.trainable_params
            tier = self.topo.tier_of(name)
            tiers = [tier] if tier in ("device", "server") else [tier, "server"]
            for t in tiers:
                peak_key, params_key = f"peak_mem_{t}_bytes", f"trainable_params_{t}"
                report[peak_key] = max(report.get(peak_key, 0), peak)
                report[params_key] = max(report.get(params_key, 0), params)
            if tier != "device":
                report["peak_mem_server_total_bytes"] += peak
        return report

    def summary(self) -> dict:
        """What this protocol adds to summary.json (e.g. the configurations it chose)."""
        return {}

    def export_protocol_state(self) -> dict:
        """State of the protocol itself (beyond workers and aggregator) a checkpoint keeps, as JSON."""
        return {}

    def import_protocol_state(self, meta: dict) -> None:  # noqa: B027 - most protocols keep no state of their own
        """Restore ``export_protocol_state``'s result; runs before the workers' states are restored."""

    # --- what each protocol defines -------------------------------------------------------
    @abstractmethod
    def train_round(self, round_index: int, participants: list[int]) -> None:
        """Run one round: adapters down, local steps, adapters up and aggregated."""

"""HSplitLoRA: importance-guided LoRA placement and ranks per device budget, aggregated without noise.

On the memory-efficient server of ``memsfl`` (per-device cuts, one base, a server-side LoRA per
device, served one at a time), each device's configuration comes from its memory budget
(``devices.memory_mb``, ``system.lora_budget``): the deepest cut that fits, then LoRA on its most
important matrices at the largest ranks of ``ranks`` that still fit. Importance
(``adapters.importance``) is measured by every stage on its own layers over the first
``importance_passes`` forward passes of each round, reported to the aggregator in ``importance``
messages and smoothed over rounds; a device's placement is chosen again only when the importance
ranking moved by more than ``reconfigure_threshold`` (Kendall distance) since it was last chosen.
Before the first measurement, matrices are taken in layer order. Adapters of different ranks and
placements are combined with ``aggregation.method`` (``stack``: exact, merged into the base).

    protocol = "hsplitlora"
    [aggregation]
    method = "stack"
    [devices]
    memory_mb = [420, 640, 900, 1200, 1680]
    [hsplitlora]
    ranks = [2, 4, 8, 16]
    reconfigure_threshold = 0.1
    importance_passes = 1
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field, field_validator
from transformers import PretrainedConfig

from splitfed.adapters.importance import ImportanceTracker
from splitfed.adapters.layout import AdapterLayout, Placement, placement_rank
from splitfed.config import ConfigError, RunConfig
from splitfed.models.loading import load_model_config
from splitfed.system.lora_budget import BudgetError, DeviceLoRA, Matrix, configure_device, ranking_shift
from splitfed.protocols.base import Context
from splitfed.protocols.memsfl import MemorySplitFed, MemsflOptions, per_device_server_routes
from splitfed.registry import register
from splitfed.system.costs import LayerCosts, layer_costs, stage_flops
from splitfed.system.cuts import MB
from splitfed.topology import Hop, Route, StagePlacement, Topology


class HsplitloraOptions(MemsflOptions):
    ranks: list[int] = [2, 4, 8, 16]
    """Ranks a matrix may get; more important matrices get the larger ones while the budget allows."""
    reconfigure_threshold: float = Field(0.1, ge=0, le=1)
    """Choose the placements again when the importance ranking moved by more than this (fraction of
    discordant pairs of matrices since the last choice); 1: never after the first measurement."""
    importance_passes: int = Field(1, ge=0)
    """Forward passes per slot and round whose matrices' importance is measured; 0: no measurement
    (placements stay in layer order)."""
    max_device_step_s: float | None = Field(None, gt=0)
    """A device's cut is at most the deepest whose forward and backward of one local step, at its compute
    budget (``devices.tflops``), take no longer than this (the cost model's FLOPs); None: memory alone decides."""

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value):
            raise ValueError(f"hsplitlora.ranks must list ranks >= 1; got {value}")
        return sorted(set(value))


def compute_cut_limit(config: RunConfig, costs: LayerCosts, device: int, total_layers: int) -> int:
    """The deepest cut whose local step fits ``max_device_step_s`` at the device's compute budget
    (``total_layers - 1`` without a time limit); ConfigError if not even one layer does."""
    limit_s = config.options.max_device_step_s
    if limit_s is None:
        return total_layers - 1
    rate = config.device_tflops(device) * 1e12
    train, rank = config.train, max(config.options.ranks)

    def step_s(cut: int) -> float:
        return stage_flops(costs, cut, train.batch_size, train.seq_len, rank, True, False).total / rate

    fitting = [cut for cut in range(1, total_layers) if step_s(cut) <= limit_s]
    if not fitting:
        raise ConfigError(f"devices.tflops: device {device} at {config.device_tflops(device):g} TFLOP/s needs "
                          f"{step_s(1):.3g} s for one layer's local step; hsplitlora.max_device_step_s is {limit_s:g}")
    return max(fitting)


def device_configuration(config: RunConfig, costs: LayerCosts, device: int, total_layers: int,
                         importance: dict[Matrix, float] | None = None) -> DeviceLoRA:
    """Device ``device``'s cut, placement and ranks under its memory (and compute) budget; ConfigError
    if one layer does not fit."""
    train = config.train
    try:
        return configure_device(costs, importance or {}, config.device_memory_mb(device) * MB,
                                max_cut=compute_cut_limit(config, costs, device, total_layers),
                                batch=train.batch_size, seq=train.seq_len,
                                ranks=tuple(config.options.ranks), device=f"devices.memory_mb: device {device}")
    except BudgetError as error:
        raise ConfigError(str(error)) from None


def placement_of(choice: DeviceLoRA) -> Placement:
    return tuple(sorted((layer, path, rank) for (layer, path), rank in choice.ranks.items()))


@register
class HSplitLoRA(MemorySplitFed):
    name = "hsplitlora"
    Options = HsplitloraOptions

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        if not config.devices.memory_mb:
            raise ValueError("protocol 'hsplitlora' configures each device from its budget: set devices.memory_mb")
        if config.devices.cuts:
            raise ValueError("protocol 'hsplitlora' chooses each device's cut from devices.memory_mb; "
                             "remove devices.cuts")
        if config.options.max_device_step_s is not None and not config.devices.tflops:
            raise ValueError("hsplitlora.max_device_step_s bounds each device's step time at its compute budget: "
                             "set devices.tflops")
        if config.aggregation.method == "fedavg":
            raise ValueError("aggregation.method: 'fedavg' needs one rank, but hsplitlora gives devices different "
                             "ranks; allowed: 'stack' (the published scheme), 'zeropad', 'svd'")

    @classmethod
    def _configurations(cls, config: RunConfig, model_config: PretrainedConfig) -> list[DeviceLoRA]:
        costs = layer_costs(model_config, config.lora.targets)
        total = model_config.num_hidden_layers
        return [device_configuration(config, costs, u, total) for u in range(config.devices.count)]

    @classmethod
    def resolve_cuts(cls, config: RunConfig, model_config: PretrainedConfig) -> list[int]:
        return [choice.cut for choice in cls._configurations(config, model_config)]

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        """memsfl's routes, each device stage with its first placement (before any importance is known)."""
        base = per_device_server_routes(config, cuts, total_layers, copies=False)
        choices = cls._configurations(config, load_model_config(config.model.source))
        routes = []
        for route, choice in zip(base.routes, choices):
            placement = placement_of(choice)
            device = replace(route.first, rank=placement_rank(placement), placement=placement)
            routes.append(Route(route.device, (device, *route.stages[1:])))
        return Topology(tuple(routes), aggregator=base.aggregator)

    @classmethod
    def largest_rank(cls, config: RunConfig) -> int:
        return max([super().largest_rank(config), *config.options.ranks])

    # --- running ------------------------------------------------------------------------------
    def __init__(self, ctx: Context) -> None:
        config, model_config = ctx.config, ctx.model.config
        self.costs = layer_costs(model_config, config.lora.targets)
        self.choices = {u: device_configuration(config, self.costs, u, model_config.num_hidden_layers)
                        for u in range(config.devices.count)}
        """Each device's current configuration (first: budgets alone, matrices in layer order)."""
        self.tracker = ImportanceTracker(config.train.rounds)
        self.chosen_on: dict[Matrix, float] = {}
        """The importance the current placements were chosen on (empty: layer order)."""
        self.reconfigurations = 0
        super().__init__(ctx)

    def layout_of(self, stage: StagePlacement) -> AdapterLayout:
        layout = super().layout_of(stage)
        if not stage.first:
            return layout
        return layout.with_placement(placement_of(self.choices[self.topo.routes_of(stage.key)[0]]))

    def train_round(self, round_index: int, participants: list[int]) -> None:
        passes = self.config.options.importance_passes
        slots = self._slots_of(participants)
        active = list(participants)
        if passes:
            targets = list(self.config.lora.targets)
            started = [(self.topo.owner(s.key), self.workers[s.worker].measure_importance(s.slot, targets, passes))
                       for s in slots]
            for owner, reply in started:
                self.attempt(owner, round_index, 0, active, reply.result)
        super().train_round(round_index, participants)
        reconfigured = False
        if passes:
            scores = self._collect_importance(round_index, slots, [u for u in participants if u not in self.dropped])
            importance = self.tracker.update(scores, round_index + 1)
            if not self.chosen_on or ranking_shift(self.chosen_on, importance) > self.config.options.reconfigure_threshold:
                reconfigured = self._reconfigure(importance, round_index)
            self.clock.transfer(self.take_sent())
        self.ctx.log({"kind": "layouts", "round": round_index, "reconfigured": reconfigured,
                      "devices": {str(u): self._described(u) for u in range(self.config.devices.count)}})

    def _collect_importance(self, round_index: int, slots: list[StagePlacement], active: list[int]
                            ) -> dict[Matrix, float]:
        """Every measuring slot's scores, carried to the aggregator; a matrix measured by several
        slots (server slots of several devices) gets the mean. A device that drops adds none."""
        prefix = self.family.layers_path + "."
        replies = [(s, self.workers[s.worker].importance(s.slot, round_index)) for s in slots
                   if not s.first or self.topo.owner(s.key) in active]
        totals: dict[Matrix, list[float]] = {}
        for stage, reply in replies:
            owner = self.topo.owner(stage.key)
            message = self.attempt(owner, round_index, 0, active, reply.result)
            if message is None:
                continue
            message = self.net.carry(Hop(stage.worker, self.topo.aggregator), owner, "up", message)
            for path, score in message.tensors.items():
                totals.setdefault(_matrix(path, prefix), []).append(float(score))
        return {m: sum(v) / len(v) for m, v in totals.items()}

    def _reconfigure(self, importance: dict[Matrix, float], round_index: int) -> bool:
        """Choose every device's placement again on ``importance``; the slots whose layout changed get
        a new adapter (its values come with the next round's download). True if any changed."""
        self.chosen_on = dict(importance)
        changed = [u for u in range(self.config.devices.count)
                   if self._choose(u, device_configuration(self.config, self.costs, u, self.total_layers, importance))]
        self._relayout(changed, round_index)
        self.reconfigurations += bool(changed)
        return bool(changed)

    def _choose(self, device: int, choice: DeviceLoRA) -> bool:
        """Adopt ``choice`` for ``device``; True if its placement changed."""
        if choice.ranks == self.choices[device].ranks:
            return False
        self.choices[device] = choice
        return True

    def _relayout(self, devices: list[int], round_index: int) -> None:
        """Give the first-stage slots of ``devices`` adapters of their current placements."""
        replies = []
        for u in devices:
            stage = self.topo.routes[u].first
            replies.append((u, self.workers[stage.worker].relayout(stage.slot, self.layout_of(stage))))
        for u, reply in replies:
            self.attempt(u, round_index, 0, [u], reply.result)  # a lost device relayouts when it rejoins (resume)

    # --- checkpoints --------------------------------------------------------------------------
    def export_protocol_state(self) -> dict:
        return {"importance": _named(self.tracker.importance), "chosen_on": _named(self.chosen_on),
                "ranks": {str(u): _named(c.ranks) for u, c in self.choices.items()},
                "reconfigurations": self.reconfigurations}

    def import_protocol_state(self, meta: dict) -> None:
        """Restore importance and placements, and give every device slot its adapter of that placement
        (before the workers' adapters are restored into them)."""
        self.tracker.importance = _unnamed(meta["importance"])
        self.chosen_on = _unnamed(meta["chosen_on"])
        self.reconfigurations = int(meta["reconfigurations"])
        for u, ranks in meta["ranks"].items():
            choice = self.choices[int(u)]
            self.choices[int(u)] = DeviceLoRA(choice.cut, _unnamed(ranks), choice.memory_bytes)
        self._relayout(list(range(self.config.devices.count)), 0)

    def _described(self, device: int) -> dict:
        choice = self.choices[device]
        return {"cut": choice.cut, "memory_mb": self.config.device_memory_mb(device),
                "estimated_mb": round(choice.memory_bytes / MB, 1), "ranks": _named(choice.ranks)}

    def summary(self) -> dict:
        return {"configurations": {"devices": [self._described(u) for u in range(self.config.devices.count)],
                               "reconfigurations": self.reconfigurations,
                               "importance": _named(self.tracker.importance)}}


def _matrix(path: str, prefix: str) -> Matrix:
    """(layer, module path in the layer) of a full module path such as ``model.layers.3.self_attn.q_proj``."""
    layer, _, inner = path[len(prefix):].partition(".")
    return int(layer), inner


def _named(values: dict[Matrix, float]) -> dict[str, float]:
    return {f"{layer}.{path}": value for (layer, path), value in sorted(values.items())}


def _unnamed(values: dict[str, float]) -> dict[Matrix, float]:
    return {(int(k.partition(".")[0]), k.partition(".")[2]): v for k, v in values.items()}

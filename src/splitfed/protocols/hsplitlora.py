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
from splitfed.adapters.layout import AdapterLayout, Placement
from splitfed.adapters.lora import layer_of, layout_config
from splitfed.config import ConfigError, RunConfig
from splitfed.models.loading import load_model_config
from splitfed.system.lora_budget import BudgetError, DeviceLoRA, Matrix, configure_device, ranking_shift
from splitfed.protocols.base import Context
from splitfed.protocols.memsfl import MemorySplitFed, MemsflOptions, per_device_server_routes
from splitfed.registry import register
from splitfed.system.costs import LayerCosts, layer_costs
from splitfed.system.cuts import MB
from splitfed.topology import Hop, Route, Topology
from splitfed.wire.messages import Message


class HsplitloraOptions(MemsflOptions):
    ranks: list[int] = [2, 4, 8, 16]
    """Ranks a matrix may get; more important matrices get the larger ones while the budget allows."""
    reconfigure_threshold: float = Field(0.1, ge=0, le=1)
    """Choose the placements again when the importance ranking moved by more than this (fraction of
    discordant pairs of matrices since the last choice); 1: never after the first measurement."""
    importance_passes: int = Field(1, ge=0)
    """Forward passes per slot and round whose matrices' importance is measured; 0: no measurement
    (placements stay in layer order)."""

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, value: list[int]) -> list[int]:
        if not value or any(r < 1 for r in value):
            raise ValueError(f"hsplitlora.ranks must list ranks >= 1; got {value}")
        return sorted(set(value))


def device_configuration(config: RunConfig, costs: LayerCosts, device: int, total_layers: int,
                         importance: dict[Matrix, float] | None = None) -> DeviceLoRA:
    """Device ``device``'s cut, placement and ranks under its budget (ConfigError if one layer does not fit)."""
    train = config.train
    try:
        return configure_device(costs, importance or {}, config.device_memory_mb(device) * MB,
                                max_cut=total_layers - 1, batch=train.batch_size, seq=train.seq_len,
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
        if config.aggregation.method == "fedavg":
            raise ValueError("aggregation.method: 'fedavg' needs one rank, but hsplitlora gives devices different "
                             "ranks; allowed: 'stack' (the published scheme), 'zeropad', 'svd'")
        if config.runtime.kind != "inproc":
            raise ValueError("protocol 'hsplitlora' runs in one process for now (runtime.kind = 'inproc'): "
                             "importance reports and reconfigurations do not cross the wire yet")

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
            device = replace(route.first, rank=max(r for *_, r in placement), placement=placement)
            routes.append(Route(route.device, (device, *route.stages[1:])))
        return Topology(tuple(routes), aggregator=base.aggregator)

    # --- running ------------------------------------------------------------------------------
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.costs = layer_costs(ctx.model.config, self.config.lora.targets)
        self.tracker = ImportanceTracker(self.config.train.rounds)
        self.chosen_on: dict[Matrix, float] = {}
        """The importance the current placements were chosen on (empty: layer order)."""
        self.choices = {u: device_configuration(self.config, self.costs, u, self.total_layers)
                        for u in range(self.config.devices.count)}
        self.reconfigurations = 0

    def layout_of(self, stage) -> AdapterLayout:
        layout = super().layout_of(stage)
        choices = getattr(self, "choices", None)  # None while the base class builds the workers
        if not stage.first or choices is None:
            return layout
        placement = placement_of(choices[self.topo.routes_of(stage.key)[0]])
        return replace(layout, placement=placement, rank=max(r for *_, r in placement))

    def train_round(self, round_index: int, participants: list[int]) -> None:
        passes = self.config.options.importance_passes
        slots = self._slots_of(participants)
        if passes:
            for stage in slots:
                self.workers[stage.worker].measure_importance(stage.slot, list(self.config.lora.targets), passes)
        super().train_round(round_index, participants)
        reconfigured = False
        if passes:
            scores = self._collect_importance(round_index, slots)
            importance = self.tracker.update(scores, round_index + 1)
            if not self.chosen_on or ranking_shift(self.chosen_on, importance) > self.config.options.reconfigure_threshold:
                reconfigured = self._reconfigure(importance)
            self.clock.transfer(self.take_sent())
        self.ctx.log({"kind": "layouts", "round": round_index, "reconfigured": reconfigured,
                      "devices": {str(u): self._described(u) for u in range(self.config.devices.count)}})

    def _collect_importance(self, round_index: int, slots) -> dict[Matrix, float]:
        """Every measuring slot's scores, carried to the aggregator; a matrix measured by several
        slots (server slots of several devices) gets the mean."""
        prefix = self.family.layers_path + "."
        totals: dict[Matrix, list[float]] = {}
        for stage in slots:
            if stage.first and self.topo.routes_of(stage.key)[0] in self.dropped:
                continue
            message: Message = self.workers[stage.worker].importance(stage.slot, round_index).result()
            message = self.net.carry(Hop(stage.worker, self.topo.aggregator), self.topo.owner(stage.key), "up", message)
            for path, score in message.tensors.items():
                matrix = (layer_of(path, self.family), path[len(prefix):].split(".", 1)[1])
                totals.setdefault(matrix, []).append(float(score))
        return {m: sum(v) / len(v) for m, v in totals.items()}

    def _reconfigure(self, importance: dict[Matrix, float]) -> bool:
        """Choose every device's placement again on ``importance``; the slots whose layout changed get
        a new adapter (its values come with the next round's download). True if any changed."""
        self.chosen_on = dict(importance)
        changed = False
        for u in range(self.config.devices.count):
            choice = device_configuration(self.config, self.costs, u, self.total_layers, importance)
            if choice.ranks == self.choices[u].ranks:
                continue
            self.choices[u] = choice
            stage = self.topo.routes[u].first
            self.workers[stage.worker].relayout(stage.slot, layout_config(self.family, self.layout_of(stage),
                                                                          self.config.lora.dropout))
            changed = True
        self.reconfigurations += changed
        return changed

    def _described(self, device: int) -> dict:
        choice = self.choices[device]
        return {"cut": choice.cut, "memory_mb": self.config.device_memory_mb(device),
                "estimated_mb": round(choice.memory_bytes / MB, 1),
                "ranks": {f"{layer}.{path}": rank for (layer, path), rank in sorted(choice.ranks.items())}}

    def summary(self) -> dict:
        return {"hsplitlora": {"devices": [self._described(u) for u in range(self.config.devices.count)],
                               "reconfigurations": self.reconfigurations,
                               "importance": {f"{layer}.{path}": score
                                              for (layer, path), score in sorted(self.tracker.importance.items())}}}

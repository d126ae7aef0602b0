"""A plan: a planner's decisions as config overrides, with the delay and memory it predicts.

``Plan.overrides()`` turns the decisions into ``--set``-style overrides (protocol,
devices.cuts, devices.ranks, compression.*_per_device, system.subchannel_owner / power_w, and
``<protocol>.scheduler`` where the planned protocol has that option), so
``splitfed run CONFIG --plan plan.json`` needs nothing beyond the config machinery. JSON
round-trips exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splitfed.config import RunConfig, parse_config
from splitfed.registry import protocol_class


@dataclass
class Plan:
    planner: str
    protocol: str
    cuts: list[int]
    ranks: list[int]
    activations: list[str]
    """Codec pipeline of each device's activations."""
    gradients: list[str]
    """Codec pipeline of the gradients sent to each device."""
    subchannels: int
    subchannel_owner: list[list[int]]
    """Per round of the configured run: the device each subchannel serves (-1 unused)."""
    power_w: list[list[float]]
    """Per round: uplink watts per subchannel; empty: devices split their maximum power equally."""
    scheduler: str
    """The planned protocol's serving order (splitfed.system.schedule); an override only where its
    options have a ``scheduler``."""
    subchannel_hz: float = 1e6
    one_at_a_time: bool = False
    """The planned protocol's server side serves the devices one at a time (in ``first_order`` at
    the first step), not all of a step's batches together."""
    round_s: list[float] = field(default_factory=list)
    """Predicted simulated seconds of each round of the configured run (what ``sim_s`` records)."""
    rounds_needed: float = 0.0
    """Rounds to the convergence model's target at the plan's rank (planning.convergence)."""
    notes: list[str] = field(default_factory=list)
    """Where the prediction leans on a model beyond what it was fitted on (e.g. rounds(rank) at another rank)."""
    device_memory_bytes: list[int] = field(default_factory=list)
    server_memory_bytes: int = 0
    first_order: list[int] = field(default_factory=list)
    """Order in which the server serves the devices in the first step."""
    device_names: list[str] = field(default_factory=list)
    activation_errors: list[dict[str, float]] = field(default_factory=list)
    """Per device: measured relative errors of its activation pipeline at its cut (``planning.calibrate``):
    ``tensor`` (whole tensor) and ``token_median`` (median over tokens); 0 for lossless pipelines."""
    gradient_errors: list[dict[str, float]] = field(default_factory=list)
    """The same for the pipeline of the gradients sent back to each device."""
    solve_s: float = 0.0
    """Seconds the planner took (measuring codec errors excluded)."""

    @property
    def sim_s(self) -> float:
        """Predicted ``sim_s`` of the configured run (sum over its rounds)."""
        return sum(self.round_s)

    @property
    def mean_round_s(self) -> float:
        return self.sim_s / max(len(self.round_s), 1)

    @property
    def total_delay_s(self) -> float:
        """Predicted training delay: rounds needed x mean round delay."""
        return self.rounds_needed * self.mean_round_s

    def overrides(self) -> list[str]:
        """The plan as ``key=value`` config overrides (TOML values)."""
        values = {
            "protocol": self.protocol,
            "devices.cuts": self.cuts,
            "devices.ranks": self.ranks,
            "compression.activations_per_device": self.activations,
            "compression.gradients_per_device": self.gradients,
            "system.subchannels": self.subchannels,
            "system.subchannel_owner": self.subchannel_owner,
            "system.power_w": self.power_w,
        }
        if "scheduler" in protocol_class(self.protocol).Options.model_fields:
            values[f"{self.protocol}.scheduler"] = self.scheduler
        return [f"{key}={json.dumps(value)}" for key, value in values.items()]

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` with the plan's decisions (a planned protocol other than the configured one
        starts from its default options: the configured protocol's section is dropped)."""
        tree = config.to_tree()
        if self.protocol != config.protocol:
            tree.pop(config.protocol, None)
        return parse_config(tree, self.overrides())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "predicted": {
            "sim_s": self.sim_s, "mean_round_s": self.mean_round_s, "total_delay_s": self.total_delay_s}}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> Plan:
        tree = json.loads(text)
        tree.pop("predicted", None)
        return cls(**tree)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: not a plan written by `splitfed plan`: {error}") from None

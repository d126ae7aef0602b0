"""A planning instance: the devices, server, channel draws and cost model of a run config, and a
fast vectorised estimate of a round's delay for candidate decisions.

The planners search with ``Problem.round_delay`` (numpy over devices, the clock's order of
events for one round); the numbers a plan reports come from ``planning.predict``, which replays
the run through the simulated clock itself, so plans and runs agree.

Nothing here names a protocol: a decision's protocol is read through its class's declarations
(``splitfed.registry``): its topology for the costs of each route's stages, and ``scheduled`` /
``serves_together`` / shared server-side slots for the order of a step's events. The estimate
assumes the split protocols' shape: routes of a device stage and server-side stages whose slots
sit with the aggregator (their adapters cross no network), on one server-side worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from numbers import Integral

import numpy as np
from transformers import PretrainedConfig

from splitfed.config import RunConfig
from splitfed.models.families import num_layers
from splitfed.planning.calibrate import CodecCalibration, CodecError, calibrate_codecs, calibration_cuts
from splitfed.registry import protocol_class, protocol_names
from splitfed.seeding import Purpose, derive_seed
from splitfed.system.schedule import Job, makespan, schedule
from splitfed.system.clock import Clock
from splitfed.system.costs import device_memory_bytes, layer_costs
from splitfed.system.traffic import adapter_message_bytes, step_bytes
from splitfed.topology import StagePlacement, Topology, groups_share_slots
from splitfed.wire.codecs import parse_pipeline

MB = 1024**2
BITS = 8


@dataclass(frozen=True)
class PlanOptions:
    """Knobs of the planners (defaults are what ``splitfed plan`` uses)."""

    max_error: float = 0.3
    """sft: limit on the mean over devices of the activation pipelines' measured relative error
    (``planning.calibrate``: ``CodecError.worst``, at each device's cut): the accuracy limit."""
    max_grad_error: float = 0.2
    """sft: the same limit for the pipelines of the activation gradients sent back to the devices.
    Tighter than ``max_error``: each device's LoRA update is built from this gradient alone, round
    after round. On SmolLM2 at cut 4 it admits unbiased 4-bit quantization (0.16), whose error is
    zero-mean noise (at 0.2 it adds 4% of the gradient's energy as variance), and shuts out top-k,
    whose error is dropped signal, a bias that accumulates: at ratio 0.5 it drops 0.24 of a typical
    token's gradient, at 0.3 half (measured by ``planning.calibrate``, 3 batches of 8 x 128)."""
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    """fedsllm: LoRA ranks to search."""
    max_subchannel_power_w: float | None = None
    """fedsllm: per-subchannel power limit (None: only each device's total)."""

    def __post_init__(self) -> None:
        for name in ("max_error", "max_grad_error"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"plan option {name} must be a finite number >= 0 (a relative error; 0 allows only "
                                 f"lossless pipelines), got {value!r}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, Integral) or r < 1 for r in self.ranks):
            raise ValueError(f"plan option ranks must be LoRA ranks >= 1, got {self.ranks!r}")
        power = self.max_subchannel_power_w
        if power is not None and not (math.isfinite(power) and power > 0):
            raise ValueError(f"plan option max_subchannel_power_w must be > 0 watts (or None: no limit), got {power!r}")


@cache
def _lossy(spec: str) -> bool:
    """Whether a pipeline changes values (anything but none and zstd)."""
    return bool(parse_pipeline(spec).transforms)


class PlanError(ValueError):
    """An instance no plan can serve (e.g. a device that cannot hold one layer); names the device."""


@dataclass
class Decision:
    """What a planner decides, per device and per round (the rounds of the configured run)."""

    protocol: str
    """The configured protocol, or the one its class names for per-device cuts (``per_device_cuts``)."""
    cuts: np.ndarray
    """(devices,) layers on each device."""
    ranks: np.ndarray
    """(devices,) LoRA rank of each device."""
    activations: list[str]
    """Codec pipeline of each device's activations."""
    gradients: list[str]
    """Codec pipeline of the activation gradients sent back to each device."""
    owners: list[np.ndarray] | None = None
    """Per round (subchannels,): the device each subchannel serves, -1 unused; None: round-robin."""
    power: list[np.ndarray] | None = None
    """Per round (subchannels,): uplink watts on each subchannel; None: each device splits its maximum."""


@dataclass(frozen=True)
class Loads:
    """Per-device seconds and bytes of one round for given cuts, ranks and codecs (arrays over devices)."""

    forward_s: np.ndarray
    backward_s: np.ndarray
    server_s: np.ndarray
    up_step: np.ndarray
    """Bytes up per step before the server computes (activations)."""
    down_step: np.ndarray
    """Bytes down per step (activation gradient)."""
    norm: np.ndarray
    clip: np.ndarray
    download: np.ndarray
    """Adapter bytes downloaded at round start."""
    upload: np.ndarray
    server_slots: tuple[frozenset[tuple[str, str]], ...]
    """Per device: the (worker, slot) keys of its route's server-side stages."""


class Problem:
    """Everything a planner needs about a config, computed once."""

    def __init__(self, config: RunConfig, model_config: PretrainedConfig, calibration: CodecCalibration | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        """``calibration``: measured codec errors to use (e.g. shared by many plans of one model and data);
        None: measured on the configured model when a planner first needs a lossy pipeline's error.
        ``progress`` gets the calibration's progress lines."""
        protocol = protocol_class(config.protocol)
        if not protocol.split:
            split = [name for name in protocol_names() if protocol_class(name).split]
            raise PlanError(f"protocol {config.protocol!r}: planners choose cuts for split protocols; allowed: "
                            f"{', '.join(split)}")
        if config.participants_per_round < config.devices.count:
            raise PlanError("train.devices_per_round: planners need every device in every round (set it to 0)")
        self.config = config
        self.costs = layer_costs(model_config, config.lora.targets)
        self.total_layers = num_layers(model_config)
        self.n = config.devices.count
        self._configs: dict[str, RunConfig] = {}
        self.clock = Clock(config, model_config, protocol.topology(config, [1] * self.n, self.total_layers))
        self.devices = self.clock.devices
        self.server = self.clock.server
        self.channel = self.clock.channel
        self.batch, self.seq = config.train.batch_size, config.train.seq_len
        self.steps = config.train.local_steps
        self.rounds = config.train.rounds
        self.ranks = np.array([config.device_rank(u) for u in range(self.n)])
        self.adapter_spec = config.compression.adapters
        self.everyone = list(range(self.n))
        self.gains = [self.clock.round_gains(r, self.everyone) for r in range(self.rounds)]
        self.budget = np.array([self._budget(u) for u in range(self.n)])
        self._memory: dict[tuple[int, int], int] = {}
        self._cache: dict[tuple, tuple[float, float]] = {}
        self.calibration = calibration
        self.calibration_s = 0.0
        """Seconds spent measuring codec errors (not planning)."""
        self._progress = progress
        self._check_feasible()

    # --- the planned protocol --------------------------------------------------------------
    def config_for(self, protocol: str) -> RunConfig:
        """The configured run as a plan with protocol ``protocol`` runs it (what ``Plan.apply`` gives):
        that protocol's options (the configured ones if it is the configured protocol, else its
        defaults) with the planned ``scheduler`` where its options have one."""
        if protocol not in self._configs:
            cls = protocol_class(protocol)
            options = self.config.options if protocol == self.config.protocol else cls.Options()
            if "scheduler" in cls.Options.model_fields:
                options = options.model_copy(update={"scheduler": self.scheduler()})
            self._configs[protocol] = self.config.model_copy(update={"protocol": protocol, "options": options})
        return self._configs[protocol]

    def topology(self, protocol: str, cuts: np.ndarray, ranks: np.ndarray) -> Topology:
        """The routes ``protocol`` declares for these cuts and device ranks."""
        config = self.config_for(protocol)
        ranks = [int(r) for r in ranks]
        if ranks != [config.device_rank(u) for u in range(self.n)]:
            config = config.model_copy(update={"devices": config.devices.model_copy(update={"ranks": ranks})})
        return protocol_class(protocol).topology(config, [int(c) for c in cuts], self.total_layers)

    # --- limits ---------------------------------------------------------------------------
    def _budget(self, u: int) -> float:
        budget = self.devices[u].memory_bytes
        given = self.config.device_memory_mb(u)
        return min(budget, given * MB) if given is not None else budget

    def memory(self, cut: int, rank: int) -> int:
        key = (cut, rank)
        if key not in self._memory:
            self._memory[key] = device_memory_bytes(self.costs, cut, rank, self.batch, self.seq)
        return self._memory[key]

    def max_cut(self, rank: int) -> np.ndarray:
        """(devices,) deepest cut each device can hold at ``rank`` (0: none), at most total - 1."""
        need = np.array([self.memory(c, rank) for c in range(1, self.total_layers)])
        return np.array([int(np.sum(need <= b)) for b in self.budget])  # memory grows with the cut

    def _check_feasible(self) -> None:
        """Every device must hold one layer at its configured rank and have power to transmit."""
        for u, device in enumerate(self.devices):
            rank = int(self.ranks[u])
            need = self.memory(1, rank)
            if self.budget[u] < need:
                raise PlanError(
                    f"device {u} ({device.name}) has {self.budget[u] / MB:.0f} MB, which cannot hold one layer "
                    f"(needs {need / MB:.0f} MB at batch {self.batch} x {self.seq}, rank {rank})"
                )
            if device.max_power_w <= 0:
                raise PlanError(
                    f"device {u} ({device.name}) has maximum transmit power {device.max_power_w} W: no rate"
                )

    # --- accuracy -------------------------------------------------------------------------
    def measure(self, specs: Iterable[str]) -> None:
        """Make ``self.calibration`` hold every lossy pipeline of ``specs``: the missing ones are measured
        on the configured model (at ``calibration_cuts`` of the configured cuts), all in one calibration."""
        known = self.calibration.specs if self.calibration is not None else frozenset()
        missing = sorted({s for s in specs if _lossy(s)} - known)
        if not missing:
            return
        started = time.perf_counter()
        cuts = calibration_cuts(self.total_layers, self.base_cuts().tolist())
        measured = calibrate_codecs(self.config, missing, cuts, progress=self._progress)
        self.calibration = measured if self.calibration is None else self.calibration.merged(measured)
        self.calibration_s += time.perf_counter() - started

    def codec_errors(self, stream: str, specs: Sequence[str], cuts: Sequence[int]) -> list[CodecError]:
        """Measured error of pipeline ``specs[i]`` on ``stream`` (activations / gradients) at cut ``cuts[i]``:
        0 for lossless pipelines (none, zstd), the calibration's for the others (``measure``)."""
        self.measure(specs)
        return [self.calibration.at(stream, s, int(c)) if _lossy(s) else CodecError(stream, s, int(c), 0.0, 0.0)
                for s, c in zip(specs, cuts, strict=True)]

    # --- costs ----------------------------------------------------------------------------
    def _stage_s(self, stage: StagePlacement, device: int) -> tuple[float, float]:
        """(forward, backward) seconds of one route's batch through ``stage`` on the machine the clock gives it
        (cached: the solvers ask for the same stages many times)."""
        machine = self.clock.machine(stage, device)
        key = ("seconds", stage.end - stage.start, stage.rank, stage.first, stage.last, machine)
        if key not in self._cache:
            self._cache[key] = self.clock.stage_s(stage, device)
        return self._cache[key]

    def _adapter(self, cut: int, rank: int, upload: bool) -> float:
        """Adapter message bytes, linear in the cut from exact sizes at 1 and 2 layers (within a
        few bytes of the exact size, which ``planning.predict`` uses)."""
        key = ("adapter", rank, upload)
        if key not in self._cache:
            one, two = (adapter_message_bytes(self.costs, range(k), rank, self.adapter_spec, upload) for k in (1, 2))
            self._cache[key] = (one, two - one)
        base, per_layer = self._cache[key]
        return base + (cut - 1) * per_layer

    def loads(self, protocol: str, cuts: np.ndarray, ranks: np.ndarray, activations: list[str],
              gradients: list[str]) -> Loads:
        """Each device's route as ``protocol`` declares it: its first stage on the device, the rest
        (at the rank of the slot, e.g. a shared slot's largest) on the server side; ``activations`` /
        ``gradients``: each device's pipelines."""
        topology = self.topology(protocol, cuts, ranks)
        routes = topology.routes
        global_rank = max(s.rank for route in routes for s in route.stages)
        device = [self._stage_s(route.first, route.device) for route in routes]
        server = [sum(sum(self._stage_s(s, route.device)) for s in route.stages[1:]) for route in routes]
        sizes = [step_bytes(self.costs, u, self.batch, self.seq, a, g)
                 for u, (a, g) in enumerate(zip(activations, gradients, strict=True))]
        return Loads(
            forward_s=np.array([f for f, _ in device]),
            backward_s=np.array([b for _, b in device]),
            server_s=np.array(server),
            up_step=np.array([s["activations"] for s in sizes], dtype=float),
            down_step=np.array([s["activation_grad"] for s in sizes], dtype=float),
            norm=np.array([s["grad_norm"] for s in sizes], dtype=float),
            clip=np.array([s["clip_scale"] for s in sizes], dtype=float),
            download=np.array([self._adapter(r.first.end - r.first.start, global_rank, False) for r in routes]),
            upload=np.array([self._adapter(r.first.end - r.first.start, r.first.rank, True) for r in routes]),
            server_slots=topology.server_side_slots(),
        )

    # --- channel --------------------------------------------------------------------------
    def equal_owners(self) -> np.ndarray:
        return np.arange(self.channel.subchannels) % self.n

    def equal_power(self, owners: np.ndarray) -> np.ndarray:
        counts = np.bincount(owners[owners >= 0], minlength=self.n)
        power = np.zeros(len(owners))
        used = owners >= 0
        power[used] = np.array([d.max_power_w for d in self.devices])[owners[used]] / counts[owners[used]]
        return power

    def rates(self, round_index: int, owners: np.ndarray, power: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(up, down) bit/s of every device in a round for an allocation (as the clock computes them)."""
        up_gains, down_gains = self.gains[round_index]
        up_power = self.equal_power(owners) if power is None else power
        down_power = np.full(self.channel.subchannels, self.server.power_w / self.channel.subchannels)
        return self.channel.rates(up_gains, owners, up_power), self.channel.rates(down_gains, owners, down_power)

    # --- delay ----------------------------------------------------------------------------
    def round_delay(self, protocol: str, loads: Loads, up: np.ndarray, down: np.ndarray) -> float:
        """Seconds of one round: adapter download, local steps, adapter upload (the clock's order)."""
        if np.any(up <= 0) or np.any(down <= 0):
            return float("inf")
        head = loads.forward_s + loads.up_step * BITS / up
        tail = loads.down_step * BITS / down + loads.backward_s + loads.norm * BITS / up
        clip = loads.clip * BITS / down
        cls, config = protocol_class(protocol), self.config_for(protocol)
        if cls.scheduled(config) or not cls.serves_together(config):  # one device at a time
            jobs = [Job(h, p, t + c) for h, p, t, c in zip(head, loads.server_s, tail, clip)]
            if cls.scheduled(config):
                rng = np.random.default_rng(derive_seed(self.config.seed, Purpose.SCHEDULE, 0))
                order = schedule(cls.scheduler(config), jobs, rng)
            else:
                order = list(range(self.n))
            if groups_share_slots(loads.server_slots, [[u] for u in order]):
                free = step = 0.0
                for u in order:  # a shared slot: the next device waits for its step
                    free = max(free, head[u]) + loads.server_s[u] + tail[u]
                    step = max(step, free + clip[u])
            else:
                step = makespan(jobs, order)
        else:  # the server takes all devices' batches together
            step = head.max() + loads.server_s.sum() + tail.max() + clip.max()
        return float((loads.download * BITS / down).max() + self.steps * step + (loads.upload * BITS / up).max())

    def scheduler(self) -> str:
        """Serving order a plan sets where the protocol has a ``scheduler`` option: exact for small
        rounds, Schrage beyond."""
        return "exact" if self.n <= 10 else "schrage"

    def mean_delay(self, decision: Decision) -> float:
        """Mean over the configured rounds of ``round_delay`` for a decision."""
        loads = self.loads(decision.protocol, decision.cuts, decision.ranks, decision.activations, decision.gradients)
        total = 0.0
        for r in range(self.rounds):
            owners = self.equal_owners() if decision.owners is None else decision.owners[r]
            power = None if decision.power is None else decision.power[r]
            total += self.round_delay(decision.protocol, loads, *self.rates(r, owners, power))
        return total / self.rounds

    def equal_decision(self) -> Decision:
        """The configured cuts and ranks, round-robin subchannels, equal power, no compression."""
        return Decision(self.config.protocol, self.base_cuts(), self.ranks.copy(), ["none"] * self.n, ["none"] * self.n)

    def base_cuts(self) -> np.ndarray:
        """The configured cuts (devices.cuts, or the deepest that fits devices.memory_mb; with a
        protocol whose devices share one cut, the deepest that fits them all)."""
        cuts = []
        for u in range(self.n):
            cut = self.config.device_cut(u)
            if cut is None:
                cut = int(self.max_cut(int(self.ranks[u]))[u])
            cuts.append(min(cut, self.total_layers - 1))
        if protocol_class(self.config.protocol).common_cut:
            cuts = [min(cuts)] * self.n
        return np.array(cuts)

"""Typed run configuration, validated once at load time and trusted everywhere else.

A config is a TOML file (see ``examples/``). ``load_config`` parses it, applies
``--set key=value`` overrides and validates every field, including the checks that
need the model's layer count (read from the model's config, never its weights).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from splitfed.registry import default_protocol, load_plugins, protocol_class, protocol_names
from splitfed.system.profiles import DEVICE_CLASSES, SERVERS, is_profile_file, load_profile
from splitfed.wire.codecs import parse_pipeline


class ConfigError(ValueError):
    """A configuration problem, with the field and what is allowed."""


def _one_of(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    source: str = "smollm2"
    """``smollm2`` (shipped SmolLM2-135M-Instruct), a local HF model directory, or a .gguf file."""


class DataSection(_Section):
    source: str = "shakespeare"
    """``shakespeare`` (shipped corpus), or a path to a .jsonl / .txt file or a directory of them."""
    partition: Literal["by_document", "iid", "dirichlet", "by_role"] = "by_document"
    """``by_document``: whole documents (Shakespeare: works) dealt to devices; ``iid``: rows shuffled and dealt
    evenly; ``dirichlet``: each document's rows split by Dir(dirichlet_alpha); ``by_role``: LEAF-style, one speaking
    role of a play per device (play texts only; devices.count at most the number of roles: 986 at seq_len 64)."""
    dirichlet_alpha: float = Field(0.5, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_chunks_per_device: int = Field(0, ge=0)
    """0 keeps all chunks; a cap keeps demos fast."""
    eval_chunks: int = Field(32, ge=1)
    documents: list[str] = []
    """Optional subset of document names (for Shakespeare: work names such as ``hamlet``)."""
    truncation: Literal["keep_end", "drop", "error"] = "keep_end"
    """A prompt/completion or chat record longer than train.seq_len: ``keep_end`` cuts it from the left
    (the prompt first, then the completion's start), ``drop`` drops it, ``error`` stops with its file:line.
    Counts are printed by ``splitfed data`` and written to summary.json under ``data``."""
    eval_source: str | None = None
    """A separate eval file or directory (same formats as ``source``): eval comes from it only, and it is
    never trained on; ``eval_fraction`` is then unused. None: the tail of every document."""
    template: Literal["plain", "chat"] = "plain"
    """``chat``: records go through the tokenizer's chat template (``messages`` records, and prompt/completion
    as a user and an assistant turn), loss on the assistant turns only."""


class LoraSection(_Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = ["q_proj", "v_proj"]
    dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("targets")
    @classmethod
    def _targets_nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("lora.targets must name at least one module, e.g. ['q_proj', 'v_proj']")
        return value


class TrainSection(_Section):
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(2e-4, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip on the norm over BOTH sides of the split (all LoRA of the step); 0 or None (``none``) disables."""
    devices_per_round: int = Field(0, ge=0)
    """0 means every device takes part in every round."""
    eval_batch_size: int = Field(8, ge=1)
    keep_checkpoints: int = Field(2, ge=0)
    """Round checkpoints kept in the run directory: the last N (the newest is the one ``latest`` names); 0 keeps all."""

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _zero_disables_clipping(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "off", ""):
            return None
        return None if value == 0 and not isinstance(value, bool) else value


class ProtocolOptions(_Section):
    """Base of a protocol's own options section (``[<protocol name>]`` in the TOML file); each
    protocol file declares its subclass as ``Options``."""


class AggregationSection(_Section):
    method: Literal["fedavg", "zeropad", "svd", "stack"] = "fedavg"
    """How adapters are combined layer by layer: ``fedavg`` (sample-weighted average; every
    participant of a layer must have one rank), ``zeropad`` (HetLoRA: zero-pad factors to the
    largest rank, average, truncate back to each participant's rank), ``svd`` (FlexLoRA: average
    the products B·A, factor back by SVD; each participant keeps the leading components), ``stack``
    (FLoRA / HSplitLoRA: stack the factors, exact at the summed rank; every role merges the result
    into its frozen base weights and the adapters restart each round)."""
    export_rank: int = Field(0, ge=0)
    """``stack``: rank of the exported PEFT adapter that approximates the merged deltas (truncated SVD;
    its error is in summary.json); 0: the largest rank of any participant."""


class DevicesSection(_Section):
    count: int = Field(4, ge=1)
    cuts: list[int] = []
    """Cut depth per device (layers on the device), cycled over devices."""
    memory_mb: list[float] = []
    """Memory budget per device in MB, cycled; when given without cuts, each cut is the deepest that fits."""
    ranks: list[int] = []
    """LoRA rank per device, cycled; empty means lora.rank for all."""
    tflops: list[float] = []
    """Compute budget per device in TFLOP/s (sustained training throughput), cycled: the device's speed in the
    system model (in place of its class's drawn speed) and, with ``hsplitlora.max_device_step_s``, a bound on
    its cut. Empty: from ``system.device_classes``."""

    @field_validator("cuts", "ranks")
    @classmethod
    def _at_least_one(cls, value: list[int], info: ValidationInfo) -> list[int]:
        bad = [v for v in value if v < 1]
        if bad:
            raise ValueError(f"devices.{info.field_name} must be >= 1; got {bad}")
        return value

    @field_validator("memory_mb", "tflops")
    @classmethod
    def _budget_positive(cls, value: list[float], info: ValidationInfo) -> list[float]:
        bad = [m for m in value if not m > 0]
        if bad:
            raise ValueError(f"devices.{info.field_name} must be > 0; got {bad}")
        return value


class CompressionSection(_Section):
    """Codec pipelines per direction, e.g. ``"topk:0.1 > quant:4 > zstd"`` (see splitfed.wire.codecs)."""

    activations: str = "none"
    """Device -> server activations (``hidden``)."""
    gradients: str = "none"
    """Server -> device activation gradients (``grad``)."""
    adapters: str = "none"
    """Adapter uploads and downloads (every LoRA tensor)."""
    error_feedback: bool = False
    """Add what compression dropped from each stream's last tensor to its next one."""
    activations_per_device: list[str] = []
    """Pipeline of device i's activations is entry i (a planner's per-device rates); empty: ``activations``."""
    gradients_per_device: list[str] = []
    """Pipeline of the gradients sent to device i is entry i; empty: ``gradients``."""

    @field_validator("activations", "gradients", "adapters")
    @classmethod
    def _valid_pipeline(cls, value: str) -> str:
        parse_pipeline(value)  # a SpecError (ValueError) is reported under the field's name
        return value

    @field_validator("activations_per_device", "gradients_per_device")
    @classmethod
    def _valid_pipelines(cls, value: list[str]) -> list[str]:
        for index, spec in enumerate(value):
            try:
                parse_pipeline(spec)
            except ValueError as error:
                raise ValueError(f"entry {index} (device {index}): {error}") from None
        return value

    def pipeline_spec(self, stream: str, device: int) -> str:
        """The pipeline spec of ``stream`` (activations / gradients / adapters) for ``device``."""
        per_device = {"activations": self.activations_per_device, "gradients": self.gradients_per_device}.get(stream)
        return per_device[device] if per_device else getattr(self, stream)


class SystemSection(_Section):
    """The simulated system behind ``sim_s``: device classes, server, OFDMA channel."""

    device_classes: list[str] = ["phone", "laptop", "jetson"]
    """Device class per device, cycled (splitfed.system.profiles.DEVICE_CLASSES), or the path of a profile
    measured by ``splitfed profile`` (``*.json``: that machine's FLOP/s and memory, no spread)."""
    server: str = "edge_server"
    """Server profile (splitfed.system.profiles.SERVERS) or a measured profile file (``*.json``): the server,
    or the cloud of a three-tier protocol."""
    edge: str = "edge_server"
    """Profile of each edge server of a three-tier protocol (splitllm)."""
    subchannels: int | None = Field(None, ge=1)
    """OFDMA subchannels; None: 16, or one per device of a round if more."""
    subchannel_hz: float = Field(1e6, gt=0)
    """Bandwidth of each subchannel, Hz."""
    noise_dbm_per_hz: float = -174.0
    backhaul_gbps: float = Field(10.0, gt=0)
    """Wired link between two server-side workers (a stage chain, edge -> cloud), Gbit/s each way."""
    backhaul_latency_ms: float = Field(0.0, ge=0)
    """One-way latency of every message on the backhaul, ms."""
    fading: Literal["rayleigh", "none"] = "rayleigh"
    seed: int | None = None
    """Seed of device positions, speeds and fading; None: the run seed."""
    subchannel_owner: list[list[int]] = []
    """Per round (rows cycled over rounds): the device each subchannel serves, -1 unused (a planner's
    assignment; needs ``subchannels``). Empty: subchannels dealt round-robin to the round's devices."""
    power_w: list[list[float]] = []
    """Per round (rows cycled): uplink transmit power on each subchannel, watts (a planner's power
    control; needs ``subchannel_owner``). Empty: a device splits its maximum power equally over its subchannels."""

    @field_validator("subchannel_owner", "power_w")
    @classmethod
    def _rows_valid(cls, value: list[list], info: ValidationInfo) -> list[list]:
        for index, row in enumerate(value):
            if not row:
                raise ValueError(f"system.{info.field_name}: row {index} is empty")
            low = -1 if info.field_name == "subchannel_owner" else 0
            bad = [v for v in row if v < low]
            if bad:
                raise ValueError(f"system.{info.field_name}: row {index} has {bad}; allowed: values >= {low}")
        return value

    @field_validator("device_classes")
    @classmethod
    def _known_classes(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in DEVICE_CLASSES and not is_profile_file(name)]
        if unknown or not value:
            raise ValueError(f"unknown device classes {unknown}; allowed: {', '.join(DEVICE_CLASSES)}, or a profile "
                             "file (*.json, written by `splitfed profile`)")
        for name in value:
            if is_profile_file(name):
                load_profile(name)
        return value

    @field_validator("server", "edge")
    @classmethod
    def _known_server(cls, value: str) -> str:
        if is_profile_file(value):
            load_profile(value)
            return value
        return _one_of(value, SERVERS, "server profile")


TORCH_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|auto)$")
TIERS = ("device", "server", "edge", "cloud")
"""Topology tiers; each is placed by the ``compute`` field of its name."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_devices() -> list[str]:
    """The torch devices this process can use: ``cpu``, ``cuda:i`` per visible GPU, ``mps`` on Apple silicon."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


class ComputeSection(_Section):
    """Where each tier's stages run (a torch device) and the precision of the frozen base weights.

    LoRA factors and optimizer state stay float32 whatever ``dtype`` is; activations and their
    gradients cross the wire in ``dtype`` unless a codec of ``compression`` says otherwise.
    ``auto`` takes the first GPU (CUDA, then MPS) this process finds, else the CPU."""

    device: str = "cpu"
    """Devices (users of a three-tier protocol): ``cpu``, ``cuda``, ``cuda:i``, ``mps`` or ``auto``."""
    server: str = "cpu"
    """The server (two tiers), with the aggregator, the evaluation and the export."""
    edge: str = "cpu"
    """Each edge server of a three-tier protocol."""
    cloud: str | None = None
    """The cloud of a three-tier protocol, with the aggregator; None: as ``server``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The frozen base weights and the activations between stages."""

    @field_validator("device", "server", "edge", "cloud")
    @classmethod
    def _device_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not TORCH_DEVICE.match(value):
            raise ValueError(f"compute.{info.field_name}: {value!r} is not a device; allowed: cpu, cuda, cuda:<index>, "
                             "mps, auto")
        return value

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def field_of(self, tier: str) -> str:
        """The field that places ``tier`` (``device``, ``server``, ``edge``, ``cloud``)."""
        field = tier if tier in TIERS else "server"
        return "server" if field == "cloud" and self.cloud is None else field

    def torch_device(self, tier: str) -> torch.device:
        """The device ``tier`` runs on in this process; ConfigError naming the field and what this
        machine has when it is not here (checked before any model loads)."""
        field = self.field_of(tier)
        name = getattr(self, field)
        available = available_devices()
        if name == "auto":
            name = next((d for d in available if d != "cpu"), "cpu")
        elif name == "cuda" and any(d.startswith("cuda") for d in available):
            name = "cuda:0"
        if name not in available:
            raise ConfigError(f"compute.{field} = {getattr(self, field)!r}: no such device on this machine; "
                              f"available: {', '.join(available)}")
        return torch.device(name)


class RuntimeSection(_Section):
    """How roles talk: in one process (default), as gRPC processes (``splitfed serve`` / ``splitfed device``),
    or with devices in Ray actors over a cluster."""

    kind: Literal["inproc", "grpc", "ray"] = "inproc"
    address: str = "127.0.0.1:50051"
    """Where the server listens and devices dial."""
    tokens: list[str] = []
    """grpc: the secret token of device i is tokens[i]; devices not listed are refused."""
    adapter_slots: Literal["pool", "per_device"] = "pool"
    """How a process's slots (devices, server-side copies) hold their LoRA: ``pool``: as plain tensors
    between turns, taking turns on a few adapters of the model (as many as train at once);
    ``per_device``: one adapter of the model each, for good (memory and build time grow with the devices;
    kept to check that the pool changes no number)."""
    edge_addresses: list[str] = []
    """grpc, three-tier protocols: where edge server e listens for its users (``splitfed edge --id e``);
    users dial their edge's address, edges dial ``address`` (the cloud)."""
    edge_tokens: list[str] = []
    """grpc, three-tier protocols: the secret token edge e presents to the cloud."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A device that does not answer a request within this time is dropped from the round."""
    connect_timeout_s: float = Field(300.0, gt=0)
    """How long ``serve`` waits for the devices to connect before the first round."""
    max_message_mb: float = Field(256.0, gt=0)
    quorum: float = Field(0.5, gt=0, le=1)
    """Fraction of a round's devices that must finish it; otherwise the round is retried."""
    max_round_retries: int = Field(3, ge=0)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    """With a CA, devices must present certificates signed by it (mutual TLS)."""
    ray_address: str | None = None
    """ray: address of a running cluster (e.g. ``auto``); None starts a local Ray."""
    ray_hosts: int = Field(0, ge=0)
    """ray: number of host actors, each holding one base model and several devices; 0: one per CPU."""
    device_threads: int = Field(0, ge=0)
    """grpc / ray: torch threads of each device process or Ray host actor; 0: torch's default (every
    core; Ray host actors get 1). Set 1 when several device processes share one machine: their
    threads otherwise oversubscribe its cores and a concurrent step gets slower, not faster."""
    trace_dir: str | None = None
    """grpc / ray: each device process appends one JSON line per request it serves (op, round, step,
    start and end wall-clock times) to ``<trace_dir>/<worker>.jsonl``: shows what ran concurrently."""


class TrackingSection(_Section):
    """Where a run's metrics go besides metrics.jsonl."""

    tensorboard: bool = False
    """Also write the scalars of metrics.jsonl as TensorBoard event files under ``RUN_DIR/tensorboard``
    (view them with ``tensorboard --logdir RUN_DIR/tensorboard``)."""


class RunConfig(_Section):
    protocol: str = Field(default_factory=default_protocol)
    """Registered protocol name (``splitfed.registry``); its options go in the section of that name."""
    seed: int = 0
    plugins: list[str] = []
    """Python modules (importable names) that define and register protocols of their own."""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    lora: LoraSection = LoraSection()
    train: TrainSection = TrainSection()
    options: Any = None
    """The protocol's options (its ``Options`` model), read from the section named after the protocol."""
    aggregation: AggregationSection = AggregationSection()
    devices: DevicesSection = DevicesSection()
    runtime: RuntimeSection = RuntimeSection()
    compression: CompressionSection = CompressionSection()
    system: SystemSection = SystemSection()
    compute: ComputeSection = ComputeSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="before")
    @classmethod
    def _protocol_section(cls, tree: Any) -> Any:
        """Move the section named after the protocol into ``options``, validated by its ``Options``."""
        if not isinstance(tree, dict) or not isinstance(tree.get("options", {}), dict):
            return tree  # already validated (a RunConfig's own fields), or not a tree: pydantic reports it
        tree = dict(tree)
        plugins = tree.get("plugins", [])
        if isinstance(plugins, list) and all(isinstance(m, str) for m in plugins):
            load_plugins(plugins)
        name = tree.setdefault("protocol", default_protocol())
        if not isinstance(name, str):
            return tree  # the field check reports it
        try:
            options_model = protocol_class(name).Options
        except ValueError as error:
            raise ValueError(f"protocol: {error}") from None
        others = sorted(k for k in tree if k != name and k in protocol_names())
        if others:
            raise ValueError(f"section [{others[0]}] configures protocol {others[0]!r}, but protocol is {name!r}")
        section = tree.pop(name, None)
        if section is None:
            section = tree.pop("options", None) or {}
        try:
            tree["options"] = options_model.model_validate(section)
        except ValidationError as error:
            raise ValueError("; ".join(_error_lines(error, prefix=name))) from None
        return tree

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.train.devices_per_round > self.devices.count:
            raise ValueError(
                f"train.devices_per_round={self.train.devices_per_round} exceeds devices.count={self.devices.count}"
            )
        ranks = sorted({self.device_rank(u) for u in range(self.devices.count)})
        if self.aggregation.method == "fedavg" and len(ranks) > 1:
            raise ValueError(
                f"aggregation.method: 'fedavg' averages adapters of one rank, but devices.ranks gives {ranks}; "
                "allowed for mixed ranks: 'zeropad', 'svd', 'stack'"
            )
        protocol_class(self.protocol).check_config(self)
        for field in ("activations_per_device", "gradients_per_device"):
            given = len(getattr(self.compression, field))
            if given and given != self.devices.count:
                raise ValueError(f"compression.{field} lists {given} pipelines for devices.count={self.devices.count}")
        if self.system.subchannels is not None and self.system.subchannels < self.participants_per_round:
            raise ValueError(
                f"system.subchannels={self.system.subchannels} cannot give each of the "
                f"{self.participants_per_round} devices of a round a subchannel"
            )
        self._check_allocation()
        return self

    def _check_allocation(self) -> None:
        """A planner's subchannel owners and powers: one entry per subchannel, owners among the devices."""
        system = self.system
        if not (system.subchannel_owner or system.power_w):
            return
        if not system.subchannel_owner:
            raise ValueError("system.power_w needs system.subchannel_owner (which device each subchannel serves)")
        if system.subchannels is None:
            raise ValueError("system.subchannel_owner needs system.subchannels (the number of subchannels)")
        if self.participants_per_round < self.devices.count:
            raise ValueError("system.subchannel_owner needs every device in every round (train.devices_per_round = 0)")
        for field in ("subchannel_owner", "power_w"):
            for index, row in enumerate(getattr(system, field)):
                if len(row) != system.subchannels:
                    raise ValueError(
                        f"system.{field}: row {index} has {len(row)} entries for system.subchannels={system.subchannels}"
                    )
        for index, row in enumerate(system.subchannel_owner):
            bad = sorted({u for u in row if u >= self.devices.count})
            if bad:
                raise ValueError(
                    f"system.subchannel_owner: row {index} names devices {bad}; allowed: -1 (unused) "
                    f"or 0..{self.devices.count - 1}"
                )

    @model_validator(mode="after")
    def _runtime_checks(self) -> RunConfig:
        if self.runtime.kind == "grpc" and len(self.runtime.tokens) < self.devices.count:
            raise ValueError(
                f"runtime.tokens: grpc needs one token per device; got {len(self.runtime.tokens)} "
                f"for devices.count={self.devices.count}"
            )
        return self

    def to_tree(self) -> dict:
        """The config as a plain tree that ``parse_config`` reads back (options under the protocol's name)."""
        tree = self.model_dump(exclude={"options"})
        tree[self.protocol] = self.options.model_dump() if self.options is not None else {}
        return tree

    # Per-device views (cycled lists).
    def device_rank(self, device: int) -> int:
        ranks = self.devices.ranks
        return ranks[device % len(ranks)] if ranks else self.lora.rank

    def device_cut(self, device: int) -> int | None:
        cuts = self.devices.cuts
        return cuts[device % len(cuts)] if cuts else None

    def device_memory_mb(self, device: int) -> float | None:
        budgets = self.devices.memory_mb
        return budgets[device % len(budgets)] if budgets else None

    def device_tflops(self, device: int) -> float | None:
        rates = self.devices.tflops
        return rates[device % len(rates)] if rates else None

    @property
    def participants_per_round(self) -> int:
        return self.train.devices_per_round or self.devices.count


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = _parse_value(raw)


def _parse_value(raw: str) -> object:
    """Parse an override the way TOML would (numbers, booleans, lists, strings)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _error_lines(error: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{field}: {message}" if field else message)
    return lines


def _format_error(error: ValidationError) -> str:
    return "invalid config:\n  " + "\n  ".join(_error_lines(error))


def parse_config(tree: dict, overrides: list[str] | None = None) -> RunConfig:
    """Validate a config tree plus ``key=value`` overrides; raise ConfigError naming the field."""
    tree = _deep_copy(tree)
    configured = tree.get("protocol")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw.strip())
    if isinstance(configured, str) and tree.get("protocol") != configured:
        tree.pop(configured, None)  # an override switched protocols: the file's section was for the old one
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def _deep_copy(tree: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_config(tree, overrides)

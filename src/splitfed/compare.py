"""Several run directories side by side: one table (terminal and markdown) and overlay plots.

Reads only what a run directory holds: summary.json (with an ``eval`` block from ``splitfed eval
--write`` if present), config.json and metrics.jsonl.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

MB = 1024 * 1024
TASK_METRICS = (("eval perplexity", "ppl", "{:.2f}"), ("BLEU", "bleu", "{:.2f}"),
                ("chrF", "chrf", "{:.2f}"), ("ROUGE-L", "rougeL", "{:.2f}"))
PLOT_NAMES = ("compare_ppl_round.png", "compare_ppl_bytes.png", "compare_ppl_sim.png")


@dataclass
class RunView:
    name: str
    summary: dict
    config: dict
    rounds: list[dict]


def load_run(run_dir: Path, name: str) -> RunView:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: not a finished run directory (no summary.json)")
    summary = json.loads(summary_path.read_text())
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    return RunView(name, summary, config, [r for r in records if r.get("kind") == "round"])


def _names(run_dirs: list[Path]) -> list[str]:
    """Short unique labels: the directory name, with parents added where two runs share it."""
    names = [d.name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    return names


def _ranks(config: dict, summary: dict) -> str:
    devices = config.get("devices", {})
    ranks = ", ".join(map(str, devices.get("ranks") or [config.get("lora", {}).get("rank", "-")]))
    chosen = sorted({r for d in (summary.get("configurations") or {}).get("devices", []) for r in d["ranks"].values()})
    if chosen:  # ranks chosen per matrix on the devices (hsplitlora), devices.ranks on the server side
        return f"devices {chosen[0]}-{chosen[-1]} per matrix; server {ranks}"
    return ranks


def _tiers(summaries: list[dict], prefix: str, suffix: str) -> list[str]:
    """Tiers present in any summary for keys ``<prefix><tier><suffix>`` (device, edge, server, ...)."""
    tiers: list[str] = []
    for summary in summaries:
        for key in summary:
            if key.startswith(prefix) and key.endswith(suffix):
                tier = key[len(prefix):len(key) - len(suffix)]
                if tier and tier not in tiers:
                    tiers.append(tier)
    return tiers


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return pattern.format(value)


def table_rows(runs: list[RunView]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per run) for the comparison table."""
    summaries = [r.summary for r in runs]
    rows: list[tuple[str, list[str]]] = [
        ("protocol", [s.get("protocol", "-") for s in summaries]),
        ("model", [Path(str(s.get("model", "-"))).name for s in summaries]),
        ("devices / rounds", [f"{s.get('devices', '-')} / {s.get('rounds', '-')}" for s in summaries]),
        ("cuts", [", ".join(map(str, s.get("cuts", []))) or "-" for s in summaries]),
        ("LoRA ranks", [_ranks(r.config, s) for r, s in zip(runs, summaries)]),
        ("base perplexity", [_fmt(s.get("base_eval_ppl"), "{:.2f}") for s in summaries]),
        ("final perplexity", [_fmt(s.get("final_eval_ppl"), "{:.2f}") for s in summaries]),
    ]
    if any("eval" in s for s in summaries):
        rows.append(("eval data (splitfed eval)", [Path(str(s["eval"].get("data", "-"))).name if "eval" in s else "-"
                                                   for s in summaries]))
    for label, key, pattern in TASK_METRICS:
        cells = [_fmt(s.get("eval", {}).get(key), pattern) for s in summaries]
        if any(c != "-" for c in cells):
            rows.append((label, cells))
    rows += [
        ("bytes up (MB)", [_fmt(s.get("bytes_up", 0) / MB, "{:.2f}") for s in summaries]),
        ("bytes down (MB)", [_fmt(s.get("bytes_down", 0) / MB, "{:.2f}") for s in summaries]),
    ]
    for tier in _tiers(summaries, "peak_mem_", "_bytes"):
        rows.append((f"peak memory {tier} (MB)",
                     [_fmt(s.get(f"peak_mem_{tier}_bytes", None) and s[f"peak_mem_{tier}_bytes"] / MB, "{:.1f}")
                      for s in summaries]))
    for tier in _tiers(summaries, "trainable_params_", ""):
        rows.append((f"trainable params {tier}", [_fmt(s.get(f"trainable_params_{tier}"), "{:,}") for s in summaries]))
    rows += [
        ("simulated time (s)", [_fmt(s.get("sim_s"), "{:.2f}") for s in summaries]),
        ("wall time (s)", [_fmt(s.get("wall_s"), "{:.1f}") for s in summaries]),
    ]
    return rows


def markdown_table(names: list[str], rows: list[tuple[str, list[str]]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| | " + " | ".join(cell(n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += ["| " + cell(label) + " | " + " | ".join(cell(c) for c in cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"


def _curve(run: RunView, x_of) -> tuple[list[float], list[float]]:
    """Perplexity per round, starting from the base model at x_of(None)."""
    xs = [x_of(None)]
    ys = [run.summary.get("base_eval_ppl", math.nan)]
    for record in run.rounds:
        xs.append(x_of(record))
        ys.append(record["eval_ppl"])
    return xs, ys


def write_plots(runs: list[RunView], out: Path) -> list[Path]:
    """Overlay plots of held-out perplexity against round, cumulative MB on the wire and simulated time."""

    def cumulative(key: str, scale: float = 1.0):
        def series(run: RunView):
            total, values = 0.0, {}
            for record in run.rounds:
                total += record.get(key, 0.0) * scale
                values[id(record)] = total
            return lambda record: 0.0 if record is None else values[id(record)]
        return series

    specs = [
        (PLOT_NAMES[0], "round (0: base model)", lambda run: lambda record: 0 if record is None else record["round"] + 1, True),
        (PLOT_NAMES[1], "cumulative MB on the wire (up + down)",
         lambda run: _sum_bytes(run), False),
        (PLOT_NAMES[2], "cumulative simulated time (s)", cumulative("sim_s"), False),
    ]
    markers = "osD^v<>ph*"
    paths = []
    for name, xlabel, series, integer_x in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, run in enumerate(runs):
            xs, ys = _curve(run, series(run))
            ax.plot(xs, ys, marker=markers[index % len(markers)], linestyle="-" if index < 10 else "--",
                    label=_label(run))
        ax.set(title=f"held-out perplexity vs {xlabel.split(' (')[0]}", xlabel=xlabel, ylabel="perplexity")
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _label(run: RunView) -> str:
    """The run's name, and its protocol when the name does not say it already."""
    protocol = str(run.summary.get("protocol", "?"))
    return run.name if run.name == protocol else f"{run.name} ({protocol})"


def _sum_bytes(run: RunView):
    total, values = 0.0, {}
    for record in run.rounds:
        total += (record.get("bytes_up", 0) + record.get("bytes_down", 0)) / MB
        values[id(record)] = total
    return lambda record: 0.0 if record is None else values[id(record)]


def compare_runs(run_dirs: list[Path], out: Path | None, console: Console | None = None) -> str:
    """Print the comparison table; with ``out``, write compare.md and the overlay plots there. Returns the markdown."""
    if not run_dirs:
        raise FileNotFoundError("give at least one run directory")
    names = _names(run_dirs)
    runs = [load_run(d, n) for d, n in zip(run_dirs, names)]
    rows = table_rows(runs)
    table = Table(title="splitfed compare")
    table.add_column("")
    for name in names:
        table.add_column(escape(name), overflow="fold")
    for label, cells in rows:
        table.add_row(escape(label), *(escape(c) for c in cells))
    (console or Console()).print(table)
    markdown = markdown_table(names, rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text("# splitfed compare\n\n" + markdown)
        write_plots(runs, out)
        (console or Console()).print(f"wrote {escape(str(out / 'compare.md'))} and {', '.join(PLOT_NAMES)}")
    return markdown

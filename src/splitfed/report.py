"""Plots and terminal summaries of a run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MB = 1024 * 1024


def write_plots(records: list[dict], summary: dict, out: Path) -> None:
    """loss.png (train loss per step), perplexity.png (eval per round), bytes.png, memory.png."""
    steps = [r for r in records if r["kind"] == "step"]
    rounds = [r for r in records if r["kind"] == "round"]
    local_steps = 1 + max((r["step"] for r in steps), default=0)
    by_step: dict[int, list[float]] = {}
    for r in steps:
        by_step.setdefault(r["round"] * local_steps + r["step"], []).append(r["loss"])
    xs = sorted(by_step)

    def figure(name: str, title: str, xlabel: str, ylabel: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        ax.set(title=f"{summary['protocol']}: {title}", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    figure("loss.png", "train loss (mean over devices)", "step", "loss",
           lambda ax: ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs]))

    def draw_ppl(ax) -> None:
        ax.plot([0] + [r["round"] + 1 for r in rounds], [summary["base_eval_ppl"]] + [r["eval_ppl"] for r in rounds], marker="o")

    figure("perplexity.png", "held-out perplexity", "round", "perplexity", draw_ppl)

    def draw_bytes(ax) -> None:
        up = down = 0.0
        ups, downs = [], []
        for r in rounds:
            up, down = up + r["bytes_up"] / MB, down + r["bytes_down"] / MB
            ups.append(up)
            downs.append(down)
        ax.plot([r["round"] + 1 for r in rounds], ups, marker="o", label="up")
        ax.plot([r["round"] + 1 for r in rounds], downs, marker="o", label="down")
        ax.legend()

    figure("bytes.png", "cumulative bytes on the wire", "round", "MB", draw_bytes)
    figure("memory.png", "peak memory", "role", "MB", lambda ax: ax.bar(
        ["device (max)", "server"], [summary["peak_mem_device_bytes"] / MB, summary["peak_mem_server_bytes"] / MB]))


def print_summary(summary: dict, out: Path, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"splitfed run: {out}", show_header=False)
    rows = [
        ("protocol", summary["protocol"]),
        ("devices / rounds", f"{summary['devices']} / {summary['rounds']}"),
        ("cuts", ", ".join(map(str, summary["cuts"])) or "-"),
        ("held-out perplexity", f"{summary['base_eval_ppl']:.2f} -> {summary['final_eval_ppl']:.2f} "
                                f"({100 * summary['ppl_reduction']:.1f}% lower)"),
        ("bytes up / down", f"{summary['bytes_up'] / MB:.1f} MB / {summary['bytes_down'] / MB:.1f} MB"),
        ("peak memory device / server", f"{summary['peak_mem_device_bytes'] / MB:.0f} MB / "
                                        f"{summary['peak_mem_server_bytes'] / MB:.0f} MB"),
        ("trainable params device / server", f"{summary['trainable_params_device']:,} / {summary['trainable_params_server']:,}"),
        ("wall time", f"{summary['wall_s']:.0f} s"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)

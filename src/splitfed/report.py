"""Plots and terminal summaries of a run directory."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

MB = 1024 * 1024
MAX_DEVICE_LEGEND = 8  # more devices: one grey line each, one legend entry


def write_plots(records: list[dict], summary: dict, out: Path) -> None:
    """loss.png (train loss per step: mean and one line per device, dashed round boundaries),
    perplexity.png (eval per round), bytes.png (MB up / down per round, bars), memory.png (peak per tier)."""
    steps = [r for r in records if r["kind"] == "step"]
    rounds = [r for r in records if r["kind"] == "round"]
    local_steps = 1 + max((r["step"] for r in steps), default=0)
    by_step: dict[int, list[float]] = {}
    by_device: dict[int, dict[int, float]] = {}
    for r in steps:
        x = r["round"] * local_steps + r["step"] + 1  # 1-based: step 1 is the first optimizer step
        by_step.setdefault(x, []).append(r["loss"])
        if isinstance(r.get("device"), int):
            by_device.setdefault(r["device"], {})[x] = r["loss"]  # a retried round: its last attempt
    xs = sorted(by_step)

    def figure(name: str, title: str, xlabel: str, ylabel: str, draw, integer_x: bool = True) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.set(title=f"{summary['protocol']}: {title}", xlabel=xlabel, ylabel=ylabel)
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    def draw_loss(ax) -> None:
        many = len(by_device) > MAX_DEVICE_LEGEND
        for index, (device, losses) in enumerate(sorted(by_device.items())):
            dxs: list[float] = []
            for x in sorted(losses):
                if dxs and x > dxs[-1] + 1:
                    dxs.append(math.nan)  # rounds the device sat out: a gap, not a line across them
                dxs.append(x)
            label = (f"device {device}" if not many else "each device") if (not many or index == 0) else None
            ax.plot(dxs, [losses.get(x, math.nan) for x in dxs], linewidth=0.8, alpha=0.5 if not many else 0.25,
                    color=None if not many else "tab:gray", label=label)
        ax.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], color="black", linewidth=2,
                marker="o" if len(xs) <= 30 else None, markersize=3, label="mean over devices")
        last_round = max((r["round"] for r in steps), default=0)
        for boundary in range(1, last_round + 1):
            ax.axvline(boundary * local_steps + 0.5, color="tab:red", linestyle="--", linewidth=0.8,
                       label="round boundary" if boundary == 1 else None)
        ax.legend(fontsize="small", ncol=2 if len(by_device) > 4 and not many else 1)

    figure("loss.png", f"train loss ({local_steps} steps per round)", "step", "loss", draw_loss)

    def draw_ppl(ax) -> None:
        ax.plot([0] + [r["round"] + 1 for r in rounds], [summary["base_eval_ppl"]] + [r["eval_ppl"] for r in rounds],
                marker="o")

    figure("perplexity.png", "held-out perplexity", "round (0: base model)", "perplexity", draw_ppl)

    def draw_bytes(ax) -> None:
        labels = [r["round"] + 1 for r in rounds]
        positions = list(range(len(rounds)))
        width = 0.38
        for offset, key, name in ((-width / 2, "bytes_up", "up"), (width / 2, "bytes_down", "down")):
            values = [r[key] / MB for r in rounds]
            bars = ax.bar([p + offset for p in positions], values, width=width, label=name)
            if len(rounds) <= 8:
                ax.bar_label(bars, fmt="%.2f", fontsize="small", padding=2)
        ax.set_xticks(positions, [str(label) for label in labels])
        if len(rounds) < 3:
            ax.set_xlim(-1, len(rounds))  # one or two rounds: bars of a readable width, not the whole axis
        ax.set_ylim(0, 1.3 * max((max(r["bytes_up"], r["bytes_down"]) / MB for r in rounds), default=1.0) or 1.0)
        ax.legend(loc="upper left", ncol=2)  # in the headroom above the bars and their labels

    total = (summary.get("bytes_up", 0) + summary.get("bytes_down", 0)) / MB
    figure("bytes.png", f"MB on the wire per round (total {total:.2f} MB)", "round", "MB", draw_bytes,
           integer_x=False)

    tiers = [k[len("peak_mem_"):-len("_bytes")] for k in summary if k.startswith("peak_mem_") and k.endswith("_bytes")]
    if summary.get("peak_mem_server_total_bytes") == summary.get("peak_mem_server_bytes"):
        tiers = [t for t in tiers if t != "server_total"]  # one server-side worker: the sum is its peak
    names = {"device": "device\n(max)", "edge": "edge\n(max)", "server_total": "server side\n(sum)",
             "server": "server side\n(max)" if "edge" in tiers or "server_total" in tiers else "server"}

    def draw_memory(ax) -> None:
        bars = ax.bar([names.get(t, t) for t in tiers], [summary[f"peak_mem_{t}_bytes"] / MB for t in tiers])
        ax.bar_label(bars, fmt="%.1f", padding=2)
        ax.margins(y=0.15)

    figure("memory.png", "peak memory per tier", "tier", "MB", draw_memory, integer_x=False)


def _loss_warning(summary: dict) -> str | None:
    """A warning when training made the held-out loss worse or not finite (a diverging run)."""
    base, final = summary.get("base_eval_loss"), summary.get("final_eval_loss")
    if base is None or final is None:
        return None
    if not math.isfinite(final):
        return (f"the final held-out loss is {final}: training diverged (lower train.lr, or keep "
                "train.max_grad_norm on)")
    if final > base:
        return (f"the held-out loss rose from {base:.4f} to {final:.4f}: this run made the model worse "
                "(diverging? lower train.lr, train for fewer local steps, or check the data)")
    return None


def print_summary(summary: dict, out: Path, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"splitfed run: {out}", show_header=False)
    rows = [
        ("protocol", summary["protocol"]),
        ("devices / rounds", f"{summary['devices']} / {summary['rounds']}"),
        ("cuts", ", ".join(map(str, summary["cuts"])) or "-"),
        ("held-out perplexity", _perplexity_change(summary)),
        ("bytes up / down", f"{summary['bytes_up'] / MB:.1f} MB / {summary['bytes_down'] / MB:.1f} MB"),
        ("peak memory device / server", f"{summary['peak_mem_device_bytes'] / MB:.0f} MB / "
                                        f"{summary['peak_mem_server_bytes'] / MB:.0f} MB"),
        ("trainable params device / server", f"{summary['trainable_params_device']:,} / {summary['trainable_params_server']:,}"),
        ("wall time", f"{summary['wall_s']:.0f} s"),
    ]
    if "peak_mem_edge_bytes" in summary:  # three tiers: each edge and the cloud are machines of their own
        rows.insert(6, ("peak memory edge / cloud / all servers",
                        f"{summary['peak_mem_edge_bytes'] / MB:.0f} MB / {summary['peak_mem_cloud_bytes'] / MB:.0f} MB / "
                        f"{summary['peak_mem_server_total_bytes'] / MB:.0f} MB"))
    export = summary.get("export")
    if export:
        rows.append(("exported adapter", f"rank {export['adapter_rank']}: relative error "
                                         f"{export['adapter_rel_error']:.3g}, eval loss {export['adapter_eval_loss']:.4f} "
                                         f"(merged/ {export['merged_eval_loss']:.4f})"))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if summary.get("configurations"):
        console.print(_configurations_table(summary["configurations"]))
    warning = _loss_warning(summary)
    if warning:
        console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", soft_wrap=True)


def _configurations_table(hsplitlora: dict) -> Table:
    """Each device's budget, cut, LoRA placement and ranks as HSplitLoRA last chose them."""
    table = Table(title=f"device configurations (reconfigured {hsplitlora['reconfigurations']} times)")
    for header in ("device", "budget MB", "estimated MB", "cut", "matrices with LoRA", "ranks (count)"):
        table.add_column(header)
    for u, device in enumerate(hsplitlora["devices"]):
        ranks = list(device["ranks"].values())
        layers = sorted({int(m.split(".", 1)[0]) for m in device["ranks"]})
        counts = ", ".join(f"{r}: {ranks.count(r)}" for r in sorted(set(ranks), reverse=True))
        table.add_row(str(u), f"{device['memory_mb']:g}", f"{device['estimated_mb']:g}", str(device["cut"]),
                      f"{len(ranks)} in layers {layers[0]}-{layers[-1]}" if layers else "none", counts)
    return table


def _number(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"


def _perplexity_change(summary: dict) -> str:
    base, final = summary["base_eval_ppl"], summary["final_eval_ppl"]
    text = f"{_number(base)} -> {_number(final)}"
    if not (math.isfinite(final) and math.isfinite(summary["final_eval_loss"])):
        return f"{text} (not finite: diverged)"
    if final > base:
        return f"{text} ({final / base:.3g}x higher: worse than the base model)"
    return f"{text} ({100 * summary['ppl_reduction']:.1f}% lower)"

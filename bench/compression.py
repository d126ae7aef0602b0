"""Compression of activations and gradients (SFT): bytes per step vs held-out perplexity.

Trains SmolLM2-135M with ``sfl`` on Shakespeare (4 devices, one work each, cut 4, batch
4 x 64 tokens, 3 rounds x 5 local steps, the settings of examples/sfl.toml) once per
setting, with the same seed and steps; a setting is a pipeline for the activations (up) and
one for the activation gradients (down). Reports bytes on the wire per device step (encoded
messages, headers included), final held-out perplexity, the decoded tensors' relative error,
and the encode+decode throughput of each pipeline on an activation-sized tensor; ``none`` and
the best setting run again at two more seeds to show how much one run scatters. Goals:
>= 95% fewer bytes than fp32 with perplexity within 2% of the uncompressed run; >= 200 MB/s.

    python bench/compression.py [--rounds 3] [--local-steps 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from _report import DOC, markdown_table, write_section  # noqa: E402
from splitfed.config import parse_config  # noqa: E402
from splitfed.run import run  # noqa: E402
from splitfed.wire import codecs  # noqa: E402
from splitfed.wire.codecs import parse_pipeline  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """Pipelines of one training run: activations (up), gradients (down), error feedback."""

    activations: str
    gradients: str
    error_feedback: bool = False

    @property
    def label(self) -> str:
        pipes = f"`{self.activations}`" if self.activations == self.gradients else f"`{self.activations}` / `{self.gradients}`"
        return pipes + (" + error feedback" if self.error_feedback else "")


def same(spec: str, error_feedback: bool = False) -> Setting:
    return Setting(spec, spec, error_feedback)


BEST = Setting("center > ecq:1.5 > zstd:1", "topk:0.05 > ecq:1 > zstd:1")
SETTINGS = [
    same("none"),
    same("fp16"),
    same("topk:0.1 > quant:8"),
    same("topk:0.05 > quant:4 > zstd"),
    # Centered, entropy-coded quantization (splitfed.wire.codecs: Center, EntropyQuant; zstd level 1
    # codes its symbols smaller and faster than level 3). The activations need the finer steps; the
    # gradients (they only train the device's LoRA below the cut) take top-k and a fine step.
    Setting("center > ecq:1.25 > zstd:1", "topk:0.02 > ecq:0.5 > zstd:1"),
    BEST,
    Setting("center > ecq:3 > zstd:1", "ecq:6 > zstd:1"),  # the aggressive setting
]
CHECK_SEEDS = (1, 2)
"""Seeds at which ``none`` and ``BEST`` run again: how much one run's perplexity change scatters."""
PLOT = DOC.parent / "compression.png"


def train(setting: Setting, rounds: int, local_steps: int, out: Path, seed: int = 0) -> dict:
    """One sfl run with ``setting``; its summary plus bytes per device step."""
    config = parse_config({
        "protocol": "sfl",
        "seed": seed,
        "data": {"max_train_chunks_per_device": 64},
        "train": {"rounds": rounds, "local_steps": local_steps, "batch_size": 4, "seq_len": 64, "lr": 2e-3},
        "devices": {"count": 4, "cuts": [4]},
        "compression": {"activations": setting.activations, "gradients": setting.gradients,
                        "error_feedback": setting.error_feedback},
    })
    summary = run(config, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    summary["bytes_per_step"] = statistics.mean(r["bytes_up"] + r["bytes_down"] for r in steps)
    return summary


def throughput(spec: str, shape: tuple[int, ...], repeats: int, one_thread: bool) -> float:
    """Encode + decode MB/s (fp32 input bytes per second), median over ``repeats``, with torch's
    default thread count; ``one_thread`` False turns off the codecs' switch to one torch thread."""
    pipeline = parse_pipeline(spec)
    if pipeline.is_identity:
        return float("inf")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(1)
    codecs.ONE_THREAD = one_thread
    times = []
    try:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            pipeline.decode(pipeline.encode(x, rng))
            times.append(time.perf_counter() - started)
    finally:
        codecs.ONE_THREAD = True
    return x.numel() * 4 / statistics.median(times[1:]) / 1e6


def plot(results: list[tuple[Setting, dict]], base: dict) -> None:
    """Bytes vs perplexity: every setting (left) and the region around the goal (right)."""
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 5.5))
    goal_bytes, goal_ppl = base["bytes_per_step"] / 1024 * 0.05, base["final_eval_ppl"] * 1.02
    for ax in (full, zoom):
        for i, (setting, s) in enumerate(results):
            ax.scatter(s["bytes_per_step"] / 1024, s["final_eval_ppl"], color=f"C{i}", zorder=3,
                       label=setting.label.replace("`", "") if ax is full else None)
        ax.axhline(goal_ppl, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(goal_bytes, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    full.set(xscale="log", yscale="log", xlabel="KiB per device step (up + down)", ylabel="final held-out perplexity",
             title="all settings")
    zoom.set(xlim=(0.6 * goal_bytes, 1.6 * goal_bytes), ylim=(base["final_eval_ppl"] * 0.99, base["final_eval_ppl"] * 1.1),
             xlabel="KiB per device step (up + down)", title="near the goal (dashed: +2% perplexity, dotted: -95% bytes)")
    fig.suptitle("sfl on SmolLM2-135M / Shakespeare: bytes vs perplexity")
    fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def _speed(value: float) -> str:
    return "-" if value == float("inf") else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="timed encode+decode repeats per pipeline")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at once, each on one torch thread")
    args = parser.parse_args()

    # Throughput first, in this process; the training runs go to worker processes.
    shape = (4, 64, 576)  # one device's activations: batch x seq x hidden
    threads = torch.get_num_threads()
    specs = list(dict.fromkeys(spec for s in SETTINGS for spec in (s.activations, s.gradients)))
    speeds = {spec: (throughput(spec, shape, args.repeats, True), throughput(spec, shape, args.repeats, False))
              for spec in specs}
    summaries: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        started = time.perf_counter()
        jobs = [(setting, 0) for setting in SETTINGS] + [(s, seed) for seed in CHECK_SEEDS for s in (SETTINGS[0], BEST)]
        futures = {pool.submit(train, setting, args.rounds, args.local_steps, Path(tmp) / f"run{i}", seed): i
                   for i, (setting, seed) in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            summaries[i] = summary = future.result()
            print(f"{jobs[i][0].label} (seed {jobs[i][1]}): {summary['bytes_per_step']:.0f} B/step, "
                  f"ppl {summary['final_eval_ppl']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    results = [(setting, summaries[i]) for i, setting in enumerate(SETTINGS)]
    by_seed = {(jobs[i][0], jobs[i][1]): s for i, s in summaries.items()}
    seed_rows = []
    for seed in (0, *CHECK_SEEDS):
        plain, best = by_seed[(SETTINGS[0], seed)], by_seed[(BEST, seed)]
        seed_rows.append([seed, f"{plain['final_eval_ppl']:.3f}", f"{best['final_eval_ppl']:.3f}",
                          f"{100 * (best['final_eval_ppl'] / plain['final_eval_ppl'] - 1):+.2f}%",
                          f"{100 * (1 - best['bytes_per_step'] / plain['bytes_per_step']):.1f}%"])

    base = results[0][1]
    rows, goal_met = [], []
    for setting, s in results:
        fewer = 1 - s["bytes_per_step"] / base["bytes_per_step"]
        ppl_change = s["final_eval_ppl"] / base["final_eval_ppl"] - 1
        if fewer >= 0.95 and ppl_change <= 0.02:
            goal_met.append(f"{setting.label} ({100 * fewer:.1f}% fewer bytes, {100 * ppl_change:+.2f}% perplexity)")
        rows.append([
            setting.label,
            f"{s['bytes_per_step'] / 1024:.1f}",
            f"{100 * fewer:.1f}%",
            f"{s['final_eval_ppl']:.3f}",
            f"{100 * ppl_change:+.2f}%",
            f"{s['activations_rel_error']:.3f}",
            f"{s['gradients_rel_error']:.3f}",
        ])
    speed_rows = [[f"`{spec}`", _speed(one), _speed(many)] for spec, (one, many) in speeds.items() if spec != "none"]

    plot(results, base)

    steps = args.rounds * args.local_steps
    verdict = (f"Goal (>= 95% fewer bytes, perplexity within 2%) met by: {', '.join(goal_met)}." if goal_met
               else "Goal (>= 95% fewer bytes, perplexity within 2%) NOT met by any setting here.")
    verdict += (
        " Each row is one 15-step run with seed 0. How much such a run's perplexity change scatters: "
        f"`none` and {BEST.label} again with seeds {', '.join(map(str, CHECK_SEEDS))} (other data order, "
        "LoRA initialisation and codec draws):"
    )
    body = (
        f"sfl, SmolLM2-135M, LoRA r=8 q/v, 4 devices (one Shakespeare work each), cut 4, batch 4 x 64, "
        f"{args.rounds} rounds x {args.local_steps} local steps ({steps} steps), lr 2e-3, seed 0; {args.jobs} runs at "
        "a time, each on one torch thread. A setting names "
        "the pipeline of the activations (up) and, after a slash, of the activation gradients (down); one "
        "pipeline alone means both; adapters are uncompressed. Bytes: encoded messages of one device step "
        "(activations with labels and attention mask, gradient, grad norm, clip factor; headers included); "
        f"fewer bytes is against `none` (fp32). Base perplexity {base['base_eval_ppl']:.2f}. Relative error: "
        "mean ||decoded - sent|| / ||sent|| over the messages.\n\n"
        + markdown_table(["setting (activations / gradients)", "KiB / step", "fewer bytes", "final ppl",
                          "ppl vs none", "act. rel. error", "grad rel. error"], rows)
        + f"\n\n{verdict}\n\n"
        + markdown_table(["seed", "`none` ppl", "best ppl", "ppl vs none", "fewer bytes"], seed_rows)
        + f"\n\n![bytes vs perplexity]({PLOT.name})\n\n"
        f"**Throughput**: encode + decode of one fp32 {'x'.join(map(str, shape))} tensor (Gaussian), median of "
        f"{args.repeats}, in MB of fp32 input per second (goal >= 200 MB/s), with torch's default {threads} "
        "threads. The codecs run their torch operations on one thread (`splitfed.wire.codecs.ONE_THREAD`): on "
        "tensors this small, intra-op threads mostly add synchronisation, and when other processes load the "
        "cores they slow every operation down many-fold. The last column turns that switch off.\n\n"
        + markdown_table(["pipeline", "MB/s (codec on 1 thread)", f"MB/s ({threads} torch threads)"], speed_rows)
        + "\n"
    )
    write_section("compression", "Compression of activations and gradients (bench/compression.py)", body)


if __name__ == "__main__":
    main()

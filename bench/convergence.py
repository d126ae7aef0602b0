"""Fit the convergence model rounds(rank) that the fedsllm planner multiplies by the round delay.

Trains the planned workload (``workload``: sfl, 4 devices with one Shakespeare work each, batch 2 x 64,
3 local steps a round, lr 2e-3, 10 rounds = 30 steps; the same runs ``bench/calibration.py`` (c) plans)
at LoRA ranks 2, 4, 8, 16 (alpha = 2 r) and seeds 0, 1, 2, and records the held-out loss after every
round. Per seed, the target is the loss the slowest rank reaches at its last round (so every rank
reaches it); steps to the target are interpolated between rounds. Then fits

    steps_to_target(r) = a + b / r

over every (rank, seed) point, reports the fit's root-mean-square error in steps, and prints the
``FITTED`` line to paste into ``splitfed/planning/convergence.py``; writes the table into
docs/benchmarks.md.

    python bench/convergence.py [--jobs 2]      # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from _report import markdown_table, write_section
from splitfed.config import RunConfig, parse_config
from splitfed.planning.convergence import fit_steps_model, steps_to_reach, workload_of
from splitfed.run import run

RANKS = (2, 4, 8, 16)
SEEDS = (0, 1, 2)


def workload(rank: int = 8, seed: int = 0) -> RunConfig:
    """The planned workload: what calibration (c) plans and the convergence model is fitted on."""
    return parse_config({
        "protocol": "sfl", "seed": seed,
        "data": {"max_train_chunks_per_device": 64, "eval_chunks": 16},
        "lora": {"rank": rank, "alpha": 2.0 * rank, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": 10, "local_steps": 3, "batch_size": 2, "seq_len": 64, "lr": 2e-3},
        "devices": {"count": 4, "cuts": [2]},
        "system": {"subchannels": 8},
    })


def loss_curve(rank: int, seed: int, out: Path) -> list[float]:
    """Held-out loss before training and after each round."""
    summary = run(workload(rank, seed), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [summary["base_eval_loss"]] + [r["eval_loss"] for r in records if r["kind"] == "round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each on one torch thread")
    args = parser.parse_args()
    keys = [(r, s) for s in SEEDS for r in RANKS]
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        futures = {key: pool.submit(loss_curve, *key, Path(tmp) / f"r{key[0]}-s{key[1]}") for key in keys}
        curves = {key: future.result() for key, future in futures.items()}
    local_steps = workload().train.local_steps
    targets = {s: max(curves[(r, s)][-1] for r in RANKS) for s in SEEDS}
    steps = {(r, s): local_steps * steps_to_reach(curves[(r, s)], targets[s]) for r, s in keys}
    a, b = fit_steps_model([r for r, _ in keys], [steps[k] for k in keys])
    residuals = [steps[(r, s)] - (a + b / r) for r, s in keys]
    error = float(np.sqrt(np.mean(np.square(residuals))))
    rows = []
    for r in RANKS:
        per_seed = [steps[(r, s)] for s in SEEDS]
        rows.append([r, " / ".join(f"{curves[(r, s)][-1]:.4f}" for s in SEEDS),
                     " / ".join(f"{x:.1f}" for x in per_seed),
                     f"{statistics.mean(per_seed):.1f} ± {statistics.stdev(per_seed):.1f}", f"{a + b / r:.1f}"])
    config = workload()
    body = (
        f"The planned workload ({', '.join(f'{k} {v}' for k, v in workload_of(config))}, 10 rounds, SmolLM2-135M, "
        f"LoRA q/v with alpha = 2 r, Shakespeare one work per device), seeds {', '.join(map(str, SEEDS))}; held-out "
        "loss after every round. Target per seed: the final loss of the slowest rank ("
        + ", ".join(f"seed {s}: {targets[s]:.4f}" for s in SEEDS) + ").\n\n"
        + markdown_table(["rank", "final loss per seed", "steps to target per seed", "mean ± sd", "fit a + b / r"], rows)
        + f"\n\nFit over the {len(keys)} runs: steps_to_target(r) = {a:.3f} + {b:.3f} / r, root-mean-square error "
        f"{error:.2f} steps. Plans at other ranks or on another workload say so (`splitfed plan` notes)."
    )
    write_section("convergence", "Convergence model for the fedsllm planner (bench/convergence.py)", body)
    print(f"FITTED = StepsModel(a={a:.4f}, b={b:.4f}, ranks={RANKS}, error={error:.4f},\n"
          f"                   workload={workload_of(config)!r})")


if __name__ == "__main__":
    main()

"""Fit the convergence model rounds(rank) that the fedsllm planner multiplies by the round delay.

Measures held-out loss curves of SmolLM2-135M LoRA (q/v) on Shakespeare at ranks 2, 4, 8, 16
(centralized protocol, one step per round, the same initial adapter seed), then fits

    steps_to_target(r) = a + b / r

where steps_to_target is the (linearly interpolated) number of steps each rank needs to bring
the held-out loss down to the target: the loss the slowest rank reaches at its last step
(so every rank reaches it). Prints the constants to paste into
``splitfed/planning/convergence.py`` (``FITTED``) and writes the table into docs/benchmarks.md.

    python bench/convergence.py [--steps 12]      # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from _report import markdown_table, write_section
from splitfed.config import parse_config
from splitfed.planning.convergence import fit_steps_model, steps_to_reach
from splitfed.run import run

RANKS = (2, 4, 8, 16)


def loss_curve(rank: int, steps: int, out: Path) -> list[float]:
    """Held-out loss before training and after each step at LoRA rank ``rank``."""
    config = parse_config({
        "protocol": "centralized", "seed": 0,
        "data": {"max_train_chunks_per_device": 32, "eval_chunks": 8},
        "lora": {"rank": rank, "alpha": 2.0 * rank, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": steps, "local_steps": 1, "batch_size": 4, "seq_len": 64, "lr": 2e-3},
        "devices": {"count": 4},
    })
    summary = run(config, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [summary["base_eval_loss"]] + [r["eval_loss"] for r in records if r["kind"] == "round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = {r: loss_curve(r, args.steps, Path(tmp) / f"r{r}") for r in RANKS}
    target = max(curve[-1] for curve in curves.values())
    steps = {r: steps_to_reach(curve, target) for r, curve in curves.items()}
    a, b = fit_steps_model(list(steps), list(steps.values()))
    rows = [[r, f"{curves[r][0]:.4f}", f"{curves[r][-1]:.4f}", f"{steps[r]:.2f}", f"{a + b / r:.2f}"] for r in RANKS]
    body = (
        f"SmolLM2-135M, LoRA q/v (alpha = 2 r), Shakespeare, centralized, batch 4 x 64, lr 2e-3, {args.steps} steps; "
        f"target held-out loss {target:.4f} (what the slowest rank reaches).\n\n"
        + markdown_table(
            ["rank", "loss at step 0", f"loss at step {args.steps}", "steps to target", "fit a + b / r"], rows)
        + f"\n\nFit: steps_to_target(r) = {a:.3f} + {b:.3f} / r. Curves: "
        + json.dumps({r: [round(x, 4) for x in c] for r, c in curves.items()})
    )
    write_section("convergence", "Convergence model for the fedsllm planner (bench/convergence.py)", body)
    print(f"FITTED = StepsModel(a={a:.4f}, b={b:.4f})")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()

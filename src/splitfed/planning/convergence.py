"""Convergence model: how many rounds a run needs as a function of the LoRA rank.

FedsLLM minimises total delay = rounds(rank) x round delay, so the planner needs rounds(rank).
We model the number of optimizer steps to reach a target held-out loss as

    steps(r) = a + b / r

(a higher rank adds capacity, with diminishing returns) and rounds = steps / local_steps.
``FITTED`` was fitted by ``bench/convergence.py`` on real runs of one workload (``FITTED.workload``:
protocol, devices, batch, sequence length, local steps, learning rate) at ranks 2, 4, 8, 16 over three
seeds; ``FITTED.error`` is the fit's root-mean-square error in steps over those runs. A plan says when it
leans on the model outside what was fitted (``notes``): ranks outside ``FITTED.ranks``, or a workload
that differs from ``FITTED.workload``. It is a coarse model of small runs: use it to rank plans, not to
promise a number of rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitfed.config import RunConfig


@dataclass(frozen=True)
class StepsModel:
    a: float
    """Steps to the target at infinite rank."""
    b: float
    """Extra steps x rank: steps(r) = a + b / r."""
    ranks: tuple[int, ...] = ()
    """The ranks of the runs it was fitted on."""
    error: float = 0.0
    """Root-mean-square error of the fit in steps, over the fitted runs (every rank and seed)."""
    workload: tuple[tuple[str, object], ...] = ()
    """What the fitted runs trained: (field, value) pairs of ``workload_of``."""

    def steps(self, rank: int) -> float:
        return self.a + self.b / rank

    def rounds(self, rank: int, local_steps: int) -> float:
        """Rounds of ``local_steps`` steps to reach the target (at least one)."""
        return max(1.0, self.steps(rank) / local_steps)

    def notes(self, ranks: list[int], workload: tuple[tuple[str, object], ...]) -> list[str]:
        """Where a plan at ``ranks`` of ``workload`` relies on the model beyond the runs it was fitted on."""
        notes = []
        outside = sorted({r for r in ranks if self.ranks and not min(self.ranks) <= r <= max(self.ranks)})
        if outside:
            notes.append(f"rounds(rank) extrapolates to rank {', '.join(map(str, outside))}: fitted on ranks "
                         f"{', '.join(map(str, self.ranks))}")
        fitted = dict(self.workload)
        differ = [f"{k} {v} (fitted: {fitted[k]})" for k, v in workload if k in fitted and fitted[k] != v]
        if differ:
            notes.append(f"rounds(rank) was fitted on another workload: {'; '.join(differ)}")
        return notes


def workload_of(config: RunConfig) -> tuple[tuple[str, object], ...]:
    """The fields of a run config (``RunConfig``) that the number of steps to a loss depends on."""
    train = config.train
    return (("protocol", config.protocol), ("devices", config.devices.count), ("batch_size", train.batch_size),
            ("seq_len", train.seq_len), ("local_steps", train.local_steps), ("lr", train.lr))


# Fitted by bench/convergence.py on 2026-12-02: SmolLM2-135M, LoRA q/v (alpha = 2 r), Shakespeare one work per
# device, 10 rounds, ranks 2-16 x seeds 0-2 (steps to target per rank, mean of seeds: r=2 30.0, r=4 23.6, r=8 20.2,
# r=16 15.9). Refit: python bench/convergence.py, then paste the line it prints here.
FITTED = StepsModel(a=15.3302, b=30.2564, ranks=(2, 4, 8, 16), error=1.4170,
                    workload=(("protocol", "sfl"), ("devices", 4), ("batch_size", 2), ("seq_len", 64),
                              ("local_steps", 3), ("lr", 0.002)))


def steps_to_reach(curve: list[float], target: float) -> float:
    """Fractional step at which a loss curve (loss before step 0, after step 1, ...) first reaches
    ``target``, interpolating linearly between steps; the curve's length - 1 if it never does."""
    for step in range(1, len(curve)):
        if curve[step] <= target:
            before, after = curve[step - 1], curve[step]
            return step - 1 + (before - target) / (before - after) if before > after else float(step)
    return float(len(curve) - 1)


def fit_steps_model(ranks: list[int], steps: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of steps = a + b / r; b is clipped at 0 (rank never slows convergence)."""
    x = 1.0 / np.asarray(ranks, dtype=float)
    y = np.asarray(steps, dtype=float)
    b, a = np.polyfit(x, y, 1)
    if b < 0:
        return float(y.mean()), 0.0
    return float(a), float(b)

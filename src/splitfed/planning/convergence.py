"""Convergence model: how many rounds a run needs as a function of the LoRA rank.

FedsLLM minimises total delay = rounds(rank) x round delay, so the planner needs rounds(rank).
We model the number of optimizer steps to reach a target held-out loss as

    steps(r) = a + b / r

(a higher rank adds capacity, with diminishing returns) and rounds = steps / local_steps.
``FITTED`` was fitted by ``bench/convergence.py`` on SmolLM2-135M held-out loss curves at
ranks 2, 4, 8, 16 (see docs/system.md and docs/benchmarks.md); refit by running that script
and pasting the constants it prints. It is a coarse model of small runs: use it to rank
plans, not to promise a number of rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepsModel:
    a: float
    """Steps to the target at infinite rank."""
    b: float
    """Extra steps x rank: steps(r) = a + b / r."""

    def steps(self, rank: int) -> float:
        return self.a + self.b / rank

    def rounds(self, rank: int, local_steps: int) -> float:
        """Rounds of ``local_steps`` steps to reach the target (at least one)."""
        return max(1.0, self.steps(rank) / local_steps)


# Fitted by bench/convergence.py on 2026-11-24 (SmolLM2-135M, q/v, alpha = 2r, Shakespeare, batch 4 x 64,
# lr 2e-3, 12 steps; steps to the target loss 4.302: r=2 12.00, r=4 8.47, r=8 6.40, r=16 4.94).
# Refit: python bench/convergence.py, then paste the line it prints here.
FITTED = StepsModel(a=4.2572, b=15.7693)


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

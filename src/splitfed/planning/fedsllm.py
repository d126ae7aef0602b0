"""``fedsllm`` planner (FedsLLM / SflLLM): minimise total delay = rounds(rank) x round delay.

Alternates, until the total delay stops improving:
(a) subchannel assignment per round: greedy (``allocate.greedy_assignment``);
(b) uplink power control per round: water-filling under each device's total power and a
    per-subchannel limit (``allocate.water_filling``);
(c) exhaustive search over one cut for all devices and one LoRA rank (``PlanOptions.ranks``)
    with (a) and (b) fixed, rounds(rank) from the fitted convergence model
    (``planning.convergence.FITTED``), subject to every device's memory.
The configured (equal) decision is the first incumbent.
"""

from __future__ import annotations

import numpy as np

from splitfed.planning.allocate import greedy_assignment, water_filling
from splitfed.planning.convergence import FITTED
from splitfed.planning.problem import Decision, PlanOptions, Problem
from splitfed.planning.spectrum import round_needs


def total_delay(problem: Problem, decision: Decision) -> float:
    return FITTED.rounds(int(decision.ranks.max()), problem.steps) * problem.mean_delay(decision)


def _allocate(problem: Problem, decision: Decision, options: PlanOptions) -> None:
    """(a) + (b) for every round, in place."""
    loads = problem.loads(decision.protocol, decision.cuts, decision.ranks, decision.activations, decision.gradients)
    max_power = np.array([d.max_power_w for d in problem.devices])
    noise = problem.channel.noise_w_per_hz * problem.channel.bandwidth_hz
    decision.owners, decision.power = [], []
    for r in range(problem.rounds):
        up_gains = problem.gains[r][0]
        owners = greedy_assignment(round_needs(problem, loads, r), up_gains, max_power, noise)
        decision.owners.append(owners)
        decision.power.append(water_filling(owners, up_gains, max_power, noise, options.max_subchannel_power_w))


def _search(problem: Problem, decision: Decision, ranks: tuple[int, ...]) -> Decision:
    """(c): the best (cut, rank) for the current allocation."""
    best, best_delay = decision, total_delay(problem, decision)
    for rank in ranks:
        deepest = int(problem.max_cut(rank).min())
        for cut in range(1, deepest + 1):
            candidate = Decision(decision.protocol, np.full(problem.n, cut), np.full(problem.n, rank),
                                 decision.activations, decision.gradients, decision.owners, decision.power)
            delay = total_delay(problem, candidate)
            if delay < best_delay:
                best, best_delay = candidate, delay
    return best


def fedsllm(problem: Problem, options: PlanOptions) -> Decision:
    incumbent = problem.equal_decision()
    best, best_delay = incumbent, total_delay(problem, incumbent)
    decision = Decision(incumbent.protocol, np.full(problem.n, int(incumbent.cuts.min())), incumbent.ranks,
                        incumbent.activations, incumbent.gradients)
    for _ in range(10):
        _allocate(problem, decision, options)
        decision = _search(problem, decision, options.ranks)
        delay = total_delay(problem, decision)
        if delay >= best_delay * (1 - 1e-6):
            break
        best, best_delay = decision, delay
    return best

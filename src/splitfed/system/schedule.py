"""Order in which a sequential server serves devices: one machine, heads and tails.

Device u reaches the server at its head r_u (forward + uplink, seconds), needs p_u seconds
of server time, then q_u more seconds before it is done (downlink + its backward). The
server runs one device at a time without preemption; a step ends when the last device is
done: makespan = max_u (C_u + q_u), C_u the time the server finishes u. This is the problem
1 | r_j | max(C_j + q_j) (NP-hard in general).

Schedulers return an order (list of job indices):
* ``fifo``: by arrival r_u (ties by index), what a server that simply queues requests does;
* ``random``: a uniformly random order (seeded);
* ``schrage``: whenever the server is free, the released job with the largest tail (Schrage's
  heuristic, at most twice the optimum, usually much closer);
* ``exact``: depth-first branch and bound; bound = Jackson's preemptive schedule (optimal for
  the relaxation with preemption), branching only on jobs that could start before every other
  remaining job ends (active schedules), first incumbent from Schrage. Fine up to ~20 jobs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from splitfed.seeding import Purpose, derive_seed

if TYPE_CHECKING:
    from splitfed.system.clock import Clock


@dataclass(frozen=True)
class Job:
    head: float
    """r_u: seconds until the job can start on the server."""
    processing: float
    """p_u: server seconds."""
    tail: float
    """q_u: seconds after the server finishes until the job is done."""


def makespan(jobs: Sequence[Job], order: Sequence[int], start: float = 0.0) -> float:
    """Completion time of the last job when the server takes ``order`` from time ``start``."""
    time, end = start, start
    for j in order:
        time = max(time, jobs[j].head) + jobs[j].processing
        end = max(end, time + jobs[j].tail)
    return end


def fifo(jobs: Sequence[Job], rng: np.random.Generator | None = None) -> list[int]:
    return sorted(range(len(jobs)), key=lambda j: (jobs[j].head, j))


def random_order(jobs: Sequence[Job], rng: np.random.Generator | None = None) -> list[int]:
    if rng is None:
        raise ValueError("the random scheduler needs a seeded numpy Generator")
    return [int(j) for j in rng.permutation(len(jobs))]


def schrage(jobs: Sequence[Job], rng: np.random.Generator | None = None) -> list[int]:
    pending = sorted(range(len(jobs)), key=lambda j: (jobs[j].head, j))
    ready: list[tuple[float, int]] = []  # (-tail, index)
    order: list[int] = []
    time, i = 0.0, 0
    while len(order) < len(jobs):
        if not ready:
            time = max(time, jobs[pending[i]].head)
        while i < len(pending) and jobs[pending[i]].head <= time:
            heapq.heappush(ready, (-jobs[pending[i]].tail, pending[i]))
            i += 1
        _, j = heapq.heappop(ready)
        order.append(j)
        time += jobs[j].processing
    return order


def preemptive_bound(jobs: Sequence[Job], remaining: Sequence[int], start: float) -> float:
    """Makespan of Jackson's preemptive schedule of ``remaining`` from ``start``: a lower bound."""
    pending = sorted(remaining, key=lambda j: jobs[j].head)
    left = {j: jobs[j].processing for j in remaining}
    ready: list[tuple[float, int]] = []
    time, end, i = start, start, 0
    while i < len(pending) or ready:
        if not ready:
            time = max(time, jobs[pending[i]].head)
        while i < len(pending) and jobs[pending[i]].head <= time:
            heapq.heappush(ready, (-jobs[pending[i]].tail, pending[i]))
            i += 1
        _, j = ready[0]
        next_release = jobs[pending[i]].head if i < len(pending) else float("inf")
        run = min(left[j], next_release - time)
        time += run
        left[j] -= run
        if left[j] <= 1e-15:
            heapq.heappop(ready)
            end = max(end, time + jobs[j].tail)
    return end


def exact(jobs: Sequence[Job], rng: np.random.Generator | None = None) -> list[int]:
    best_order = schrage(jobs)
    best = makespan(jobs, best_order)

    def search(order: list[int], remaining: set[int], time: float, end: float) -> None:
        nonlocal best, best_order
        if not remaining:
            if end < best:
                best, best_order = end, list(order)
            return
        if max(end, preemptive_bound(jobs, remaining, time)) >= best:
            return
        earliest_end = min(max(time, jobs[k].head) + jobs[k].processing for k in remaining)
        for j in sorted(remaining, key=lambda k: -jobs[k].tail):
            done = max(time, jobs[j].head) + jobs[j].processing
            if max(time, jobs[j].head) >= earliest_end and done > earliest_end:
                continue  # another job fits entirely before j starts: not an active schedule
            order.append(j)
            remaining.remove(j)
            search(order, remaining, done, max(end, done + jobs[j].tail))
            remaining.add(j)
            order.pop()

    search([], set(range(len(jobs))), 0.0, 0.0)
    return best_order


SCHEDULERS: dict[str, Callable[[Sequence[Job], np.random.Generator | None], list[int]]] = {
    "fifo": fifo,
    "schrage": schrage,
    "exact": exact,
    "random": random_order,
}


def schedule(name: str, jobs: Sequence[Job], rng: np.random.Generator | None = None) -> list[int]:
    """The order of ``jobs`` chosen by scheduler ``name``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](jobs, rng)


def serving_order(clock: Clock, participants: list[int], scheduler: str, seed: int, step_index: int) -> list[int]:
    """The order in which a sequential server (memsfl) serves ``participants`` at a step:
    ``scheduler`` applied to the clock's predicted timings (random draws seeded per step)."""
    timings = [clock.timing(u) for u in participants]
    jobs = [Job(t.head_s, t.server_s, t.tail_s) for t in timings]
    rng = np.random.default_rng(derive_seed(seed, Purpose.SCHEDULE, step_index))
    return [participants[j] for j in schedule(scheduler, jobs, rng)]

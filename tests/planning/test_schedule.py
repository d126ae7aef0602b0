"""Schedulers against brute force over all orders (random instances, n <= 8)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from splitfed.registry import protocol_class
from splitfed.system.schedule import SCHEDULERS, Job, exact, fifo, makespan, schedule, schrage
from splitfed.run import run
from tests.conftest import tiny_run_config


def _instances(n: int, count: int, seed: int) -> list[list[Job]]:
    rng = np.random.default_rng(seed)
    return [
        [Job(*rng.uniform([0, 0.1, 0], [3, 1, 3])) for _ in range(n)]
        for _ in range(count)
    ]


@pytest.mark.parametrize("n", range(1, 9))
def test_exact_equals_brute_force_and_schrage_beats_fifo(n):
    for jobs in _instances(n, 30 if n < 8 else 8, seed=n):
        brute = min(makespan(jobs, order) for order in itertools.permutations(range(n)))
        best = makespan(jobs, exact(jobs))
        assert best == pytest.approx(brute, abs=1e-12)
        assert makespan(jobs, schrage(jobs)) <= makespan(jobs, fifo(jobs)) + 1e-12
        assert sorted(exact(jobs)) == list(range(n))


@pytest.mark.parametrize(
    "jobs, order, expected",
    [
        ([Job(0, 1, 5), Job(0, 1, 0)], [0, 1], 6.0),  # long tail first: 1 + 5
        ([Job(0, 1, 5), Job(0, 1, 0)], [1, 0], 7.0),  # 2 + 5
        ([Job(2, 1, 0), Job(0, 1, 0)], [0, 1], 4.0),  # the server idles until 2
        ([Job(0, 0, 0)], [0], 0.0),
    ],
)
def test_makespan(jobs, order, expected):
    assert makespan(jobs, order) == expected


def test_zero_processing_jobs_and_known_names():
    jobs = [Job(0, 0, 1), Job(0, 0, 2), Job(1, 1, 0)]
    assert makespan(jobs, exact(jobs)) == 2.0
    assert set(SCHEDULERS) == set(protocol_class("memsfl").Options.model_fields["scheduler"].annotation.__args__)
    assert sorted(schedule("random", jobs, np.random.default_rng(0))) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown scheduler 'lifo'; allowed: fifo, schrage, exact, random"):
        schedule("lifo", jobs)


def test_memsfl_order_changes_time_not_results(tiny_llama_dir, corpus_dir, tmp_path):
    def losses_and_time(scheduler: str) -> tuple[dict, float]:
        config = tiny_run_config(tiny_llama_dir, corpus_dir, "memsfl", memsfl={"scheduler": scheduler},
                                 devices={"count": 4, "cuts": [1, 2, 4, 5]}, train={"rounds": 1, "local_steps": 2})
        summary = run(config, tmp_path / scheduler, progress=False)
        records = [json.loads(line) for line in (tmp_path / scheduler / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], r["device"]): r["loss"] for r in records if r["kind"] == "step"}, summary["sim_s"]

    fifo_losses, fifo_s = losses_and_time("fifo")
    exact_losses, exact_s = losses_and_time("exact")
    assert exact_losses == fifo_losses
    assert exact_s <= fifo_s

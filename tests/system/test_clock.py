"""The simulated clock follows the protocols' order of events, and every run records sim_s."""

from __future__ import annotations

import json

import pytest

from splitfed.config import ConfigError, parse_config
from splitfed.system.schedule import Job, makespan
from splitfed.run import run
from splitfed.registry import protocol_class
from splitfed.system.clock import Clock
from tests.conftest import TINY_CONFIGS, tiny_run_config

KINDS = ("activations", "activation_grad", "grad_norm", "clip_scale")


def _topology(config, cuts: list[int]):
    return protocol_class(config.protocol).topology(config, cuts, TINY_CONFIGS["llama"]().num_hidden_layers)


def _clock(protocol: str, cuts: list[int], **options) -> Clock:
    config = parse_config({"protocol": protocol, "devices": {"count": len(cuts), "cuts": cuts}, protocol: options})
    clock = Clock(config, TINY_CONFIGS["llama"](), _topology(config, cuts))
    clock.begin_round(0, list(range(len(cuts))))
    return clock


def _sent(clock: Clock, devices: list[int]) -> dict[tuple[int, str, str], int]:
    """Bytes of one step as the link would count them: activations and gradients, no control."""
    sent = {}
    for u in devices:
        hop = clock.routes[u].hops[0]
        for kind in KINDS:
            name = hop.name if kind in ("activations", "grad_norm") else hop.reverse().name
            sent[(u, name, kind)] = clock.step_bytes(u)[kind] if kind in KINDS[:2] else 0
    return sent


def test_sequential_step_is_the_scheduling_makespan():
    clock = _clock("memsfl", [1, 2, 4, 5])
    jobs = [Job(t.head_s, t.server_s, t.tail_s) for t in map(clock.timing, range(4))]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        done = clock.split_step([[u] for u in order], _sent(clock, range(4)), shared_slot=False)
        assert max(done.values()) == pytest.approx(makespan(jobs, order), rel=1e-12)


def test_shared_slot_waits_and_parallel_batches_together():
    clock = _clock("sfl", [2, 2, 2])
    sent = _sent(clock, range(3))
    sequential = max(clock.split_step([[0], [1], [2]], sent, shared_slot=True).values())
    pipelined = max(clock.split_step([[0], [1], [2]], sent, shared_slot=False).values())
    assert sequential > pipelined
    t = [clock.timing(u) for u in range(3)]
    parallel = clock.split_step([[0, 1, 2]], sent, shared_slot=False)
    expected = max(x.head_s for x in t) + sum(x.server_s for x in t) + max(x.tail_s for x in t)
    assert parallel == {u: pytest.approx(expected) for u in range(3)}  # the slot steps once all norms are in


def test_no_rate_names_the_device():
    config = parse_config({"protocol": "sfl", "devices": {"count": 2, "cuts": [1]}, "system": {"fading": "none"}})
    clock = Clock(config, TINY_CONFIGS["llama"](), _topology(config, [1, 1]))
    clock.devices[1] = type(clock.devices[1])("dead1", 1e12, 1e9, 0.0, 100.0)
    with pytest.raises(ValueError, match=r"device 1 \(dead1\) gets no rate"):
        clock.begin_round(0, [0, 1])


@pytest.mark.parametrize("protocol, scheduler", [("memsfl", "schrage"), ("fedlora", "fifo"), ("sfl", "fifo")])
def test_runs_record_sim_s(tiny_llama_dir, corpus_dir, tmp_path, protocol, scheduler):
    options = {protocol: {"scheduler": scheduler}} if protocol == "memsfl" else {}
    config = tiny_run_config(tiny_llama_dir, corpus_dir, protocol, **options,
                             devices={"count": 3, "cuts": [1, 3] if protocol == "memsfl" else [2]})
    summary = run(config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in (rounds := [r for r in records if r["kind"] == "round"]):
        steps = [s for s in records if s["kind"] == "step" and s["round"] == r["round"]]
        step_s = sum(max(s["sim_s"] for s in steps if s["step"] == k) for k in range(config.train.local_steps))
        assert 0 < step_s < r["sim_s"]  # plus adapter download and upload
    assert summary["sim_s"] == pytest.approx(sum(r["sim_s"] for r in rounds))


@pytest.mark.parametrize(
    "system, expected",
    [
        ({"subchannels": 2}, "system.subchannels=2 cannot give each of the 4 devices of a round a subchannel"),
        ({"device_classes": ["toaster"]}, r"system.device_classes: unknown device classes \['toaster'\]; allowed: phone"),
        ({"server": "mainframe"}, "system.server: unknown server profile 'mainframe'; allowed: edge_server, gpu_server"),
    ],
)
def test_bad_system_section_names_the_field(system, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config({"protocol": "sfl", "devices": {"count": 4, "cuts": [1]}, "system": system})

"""SplitLLM (user -> edge -> cloud): the middle tier changes nothing mathematically, the pairing
covers every user, and the accounting has one entry per tier."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import ConfigError
from splitfed.run import build_protocol, plan_run, run
from tests.conftest import tiny_run_config


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _splitllm(model_dir, corpus_dir, **sections):
    return tiny_run_config(model_dir, corpus_dir, "splitllm", **sections)


def test_one_edge_one_user_equals_sfl_step_by_step(tiny_model_dir, corpus_dir, tmp_path):
    common = dict(devices={"count": 1, "cuts": [2]}, data={"partition": "iid"}, train={"max_grad_norm": 0.5})
    three = _splitllm(tiny_model_dir, corpus_dir, splitllm={"edges": 1, "cloud_cut": 4}, **common)
    two = tiny_run_config(tiny_model_dir, corpus_dir, "sfl", **common)
    summary = run(three, tmp_path / "splitllm", progress=False)
    run(two, tmp_path / "sfl", progress=False)
    got = [r for r in _records(tmp_path / "splitllm") if r["kind"] == "step"]
    want = [r["loss"] for r in _records(tmp_path / "sfl") if r["kind"] == "step"]
    assert len(got) == len(want) == three.train.rounds * three.train.local_steps
    assert [r["loss"] for r in got] == pytest.approx(want, rel=1e-5)
    left, right = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("splitllm", "sfl"))
    assert left.keys() == right.keys() and left
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-5, atol=1e-6)
    # bytes per hop: the user's wireless hop and the edge's backhaul hop, both ways
    assert all(set(r["bytes_by_hop"]) == {"user0->edge0", "edge0->user0", "edge0->cloud", "cloud->edge0"}
               for r in got)
    assert all(r["bytes_by_hop"]["edge0->cloud"] > 0 for r in got)
    for key in ("peak_mem_device_bytes", "peak_mem_edge_bytes", "peak_mem_cloud_bytes"):
        assert summary[key] > 0, key
    assert summary["peak_mem_server_bytes"] == max(summary["peak_mem_edge_bytes"], summary["peak_mem_cloud_bytes"])
    assert summary["peak_mem_server_total_bytes"] == summary["peak_mem_edge_bytes"] + summary["peak_mem_cloud_bytes"]


@pytest.mark.parametrize("order", ["rotate", "random"])
def test_pairing_covers_every_user(tiny_llama_dir, corpus_dir, order):
    config = _splitllm(tiny_llama_dir, corpus_dir, devices={"count": 7, "cuts": [1, 1, 2]}, data={"partition": "iid"},
                       splitllm={"edges": 2, "cloud_cut": 4, "order": order})
    protocol, _ = build_protocol(plan_run(config), log=lambda record: None)
    edges = {u: u % 2 for u in range(7)}  # round-robin: edge 0 has 4 users, edge 1 has 3
    rounds = [protocol.participants(r) for r in range(4)]
    for chosen in rounds:
        assert sorted(edges[u] for u in chosen) == [0, 1]  # one user per edge, every round
    assert {u for chosen in rounds for u in chosen} == set(range(7))  # 4 rounds = ceil(4 users per edge)
    # users of one edge with different cuts train different edge slots on the same edge worker
    slots = {(s.worker, s.slot, s.start, s.end) for r in protocol.topo.routes for s in r.stages[1:2]}
    assert slots == {("edge0", "cut1", 1, 4), ("edge0", "cut2", 2, 4), ("edge1", "cut1", 1, 4), ("edge1", "cut2", 2, 4)}


def test_cloud_lora_per_edge_and_shared(tiny_llama_dir, corpus_dir):
    for option, slots in (("shared", {"cloud"}), ("per_edge", {"edge0", "edge1"})):
        config = _splitllm(tiny_llama_dir, corpus_dir, splitllm={"edges": 2, "cloud_cut": 4, "cloud_lora": option})
        protocol, _ = build_protocol(plan_run(config), log=lambda record: None)
        assert {r.stages[2].slot for r in protocol.topo.routes} == slots


@pytest.mark.parametrize(("sections", "message"), [
    ({"splitllm": {"edges": 5}}, r"edges \[4\] have no user"),
    ({"splitllm": {"edges": 2, "edge_of": [0, 1]}}, "one per user"),
    ({"splitllm": {"edges": 2, "edge_of": [0, 1, 2, 0]}}, "allowed: 0..1"),
    ({"splitllm": {"cloud_cut": 2}}, "above every user cut"),
    ({"train": {"devices_per_round": 2}}, "devices_per_round must be 0"),
])
def test_bad_configs_name_the_field(tiny_llama_dir, corpus_dir, sections, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        plan_run(_splitllm(tiny_llama_dir, corpus_dir, **sections))


def test_backhaul_latency_prices_the_edge_cloud_hop(tiny_llama_dir, corpus_dir, tmp_path):
    """Every step sends activations edge -> cloud and gradients back over the backhaul, one after the other:
    a latency of 50 ms adds 100 ms per step, plus at most 100 ms per round for the adapters."""
    sims = {}
    for latency in (0.0, 50.0):
        config = _splitllm(tiny_llama_dir, corpus_dir, splitllm={"edges": 2, "cloud_cut": 4},
                           system={"backhaul_latency_ms": latency}, data={"partition": "iid"})
        sims[latency] = run(config, tmp_path / str(latency), progress=False)["sim_s"]
    steps, rounds = config.train.rounds * config.train.local_steps, config.train.rounds
    assert 0.1 * steps - 1e-6 <= sims[50.0] - sims[0.0] <= 0.1 * steps + 0.1 * rounds + 1e-6

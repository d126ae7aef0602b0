"""HSplitLoRA as a protocol: budgets decide cuts, placements and ranks; importance is measured in rounds,
reported in counted messages and reconfigures the placements; adapters are stacked and merged."""

from __future__ import annotations

import json

import pytest

from splitfed.config import ConfigError
from splitfed.run import plan_run, run
from tests.conftest import tiny_run_config

BUDGETS_MB = [1.0, 2.0, 4.0]


def _config(model_dir, corpus_dir, **sections):
    tree = {"aggregation": {"method": "stack"}, "devices": {"count": 3, "cuts": [], "memory_mb": BUDGETS_MB},
            "train": {"rounds": 3, "local_steps": 2}, **sections}
    return tiny_run_config(model_dir, corpus_dir, "hsplitlora", **tree)


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hsplitlora")
    summary = run(_config(tiny_llama_dir, corpus_dir), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_every_device_configuration_stays_within_its_budget(finished):
    summary, records = finished
    devices = summary["configurations"]["devices"]
    assert [d["memory_mb"] for d in devices] == BUDGETS_MB
    for device in devices:
        assert 0 < device["estimated_mb"] <= device["memory_mb"]
        assert set(device["ranks"].values()) <= {2, 4, 8, 16}
        assert all(int(matrix.split(".")[0]) < device["cut"] for matrix in device["ranks"])  # LoRA on its own layers
    assert summary["cuts"] == [d["cut"] for d in devices]
    assert len({d["cut"] for d in devices}) > 1  # budgets 4x apart give different cuts
    layouts = [r for r in records if r["kind"] == "layouts"]
    assert [r["round"] for r in layouts] == [0, 1, 2]
    assert layouts[-1]["devices"] == {str(u): d for u, d in enumerate(devices)}


def test_importance_is_measured_for_every_layer_and_its_messages_are_counted(finished):
    summary, records = finished
    importance = summary["configurations"]["importance"]
    assert len(importance) == 6 * 2  # every layer's q_proj and v_proj: devices measure theirs, the server the rest
    assert all(score > 0 for score in importance.values())
    rounds = [r for r in records if r["kind"] == "round"]
    assert all(r["bytes_by_kind"]["importance"] > 0 for r in rounds)
    assert all(r["bytes_by_kind"]["importance"] < r["bytes_by_kind"]["adapter_upload"] for r in rounds)  # small
    assert [("adapter_merge" in r["bytes_by_kind"]) for r in rounds] == [False, True, True]  # merges from round 1 on
    assert summary["configurations"]["reconfigurations"] >= 1  # the first measurement replaces the layer order


def test_same_seed_gives_the_same_placements_and_numbers(finished, tiny_llama_dir, corpus_dir, tmp_path):
    summary, _ = finished
    again = run(_config(tiny_llama_dir, corpus_dir), tmp_path / "again", progress=False)
    assert again["configurations"] == summary["configurations"]
    assert again["final_eval_loss"] == summary["final_eval_loss"]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"devices": {"count": 3, "cuts": [], "memory_mb": [0.01]}},
         r"devices.memory_mb: device 0: a memory budget of 0.01 MB cannot hold one layer"),
        ({"aggregation": {"method": "fedavg"}}, "'fedavg' needs one rank, but hsplitlora gives devices different ranks"),
        ({"devices": {"count": 3, "cuts": [2], "memory_mb": [1.0]}}, "remove devices.cuts"),
        ({"hsplitlora": {"ranks": [0, 4]}}, r"hsplitlora.ranks must list ranks >= 1"),
    ],
)
def test_bad_configurations_are_refused_before_any_weights_load(tiny_llama_dir, corpus_dir, sections, expected):
    with pytest.raises(ConfigError, match=expected):
        plan_run(_config(tiny_llama_dir, corpus_dir, **sections))


def test_resume_restores_importance_and_placements(tiny_llama_dir, corpus_dir, tmp_path):
    """Reconfiguring every round (threshold 0), then training the last round again from the checkpoint
    before it, gives the uninterrupted run's placements, importance and numbers."""
    import shutil

    config = _config(tiny_llama_dir, corpus_dir, hsplitlora={"reconfigure_threshold": 0.0},
                     train={"rounds": 3, "local_steps": 2, "keep_checkpoints": 0})
    whole = run(config, tmp_path / "whole", progress=False)
    assert whole["configurations"]["reconfigurations"] >= 2  # the restored state includes changed placements
    shutil.copytree(tmp_path / "whole", tmp_path / "again")
    resumed = run(config, tmp_path / "again", progress=False, resume_from="round-0001")
    assert resumed["configurations"] == whole["configurations"]
    assert resumed["final_eval_loss"] == pytest.approx(whole["final_eval_loss"], abs=1e-6)


def test_a_compute_budget_bounds_the_cut_and_sets_the_device_speed(tiny_llama_dir, corpus_dir):
    from splitfed.models.loading import load_model_config
    from splitfed.registry import protocol_class
    from splitfed.system.clock import Clock

    memory_only = plan_run(_config(tiny_llama_dir, corpus_dir)).cuts
    rates = [2e-5, 1e-3, 1.0]  # TFLOP/s: the slowest device runs one layer within the time limit (0.33 s), not two
    config = _config(tiny_llama_dir, corpus_dir, hsplitlora={"max_device_step_s": 0.5},
                     devices={"count": 3, "cuts": [], "memory_mb": BUDGETS_MB, "tflops": rates})
    cuts = plan_run(config).cuts
    assert cuts[0] < memory_only[0] and cuts[1:] == memory_only[1:]
    model_config = load_model_config(str(tiny_llama_dir))
    clock = Clock(config, model_config, protocol_class("hsplitlora").topology(config, cuts, model_config.num_hidden_layers))
    assert [d.flops for d in clock.devices] == [r * 1e12 for r in rates]
    for u in range(3):  # the system model's own prediction of each device's step stays within the limit
        assert sum(clock.device_s(u)) <= 0.5


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"hsplitlora": {"max_device_step_s": 1.0}}, "hsplitlora.max_device_step_s bounds .* set devices.tflops"),
        ({"hsplitlora": {"max_device_step_s": 1e-9},
          "devices": {"count": 3, "cuts": [], "memory_mb": BUDGETS_MB, "tflops": [1.0]}},
         r"devices.tflops: device 0 at 1 TFLOP/s needs .* s for one layer's local step"),
        ({"devices": {"count": 3, "cuts": [], "memory_mb": BUDGETS_MB, "tflops": [0.0]}}, "devices.tflops must be > 0"),
    ],
)
def test_bad_compute_budgets_are_refused(tiny_llama_dir, corpus_dir, sections, expected):
    with pytest.raises(ConfigError, match=expected):
        plan_run(_config(tiny_llama_dir, corpus_dir, **sections))

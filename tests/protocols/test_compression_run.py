"""A compressed split run counts fewer bytes than an uncompressed one, still trains, and reports
its compression statistics per round and in the summary."""

from __future__ import annotations

import json

import pytest

from splitfed.run import run
from tests.conftest import tiny_run_config


def _records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_compressed_run_counts_fewer_bytes_and_still_trains(tiny_llama_dir, corpus_dir, tmp_path):
    compression = {
        "activations": "topk_token:0.25 > quant:4 > zstd",
        "gradients": "topk:0.25 > quant:8 > zstd",
        "adapters": "bf16",
        "error_feedback": True,
    }
    plain = run(tiny_run_config(tiny_llama_dir, corpus_dir, "sfl"), tmp_path / "plain", progress=False)
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", compression=compression)
    packed = run(config, tmp_path / "packed", progress=False)

    assert packed["bytes_up"] < 0.35 * plain["bytes_up"]
    assert packed["bytes_down"] < 0.5 * plain["bytes_down"]
    assert packed["final_eval_loss"] < packed["base_eval_loss"]  # it still trains
    assert packed["final_eval_loss"] == pytest.approx(plain["final_eval_loss"], rel=0.1)

    for stream in ("activations", "gradients", "adapters"):
        assert 0 < packed[f"{stream}_ratio"] < plain[f"{stream}_ratio"]
        assert 0 < packed[f"{stream}_rel_error"] < 1
        assert plain[f"{stream}_rel_error"] == 0.0
    for record in _records(tmp_path / "packed", "round"):
        assert record["activations_bytes"] < record["activations_fp32_bytes"] * 0.35
        assert record["activations_ratio"] == record["activations_bytes"] / record["activations_fp32_bytes"]
    step_bytes = sum(r["bytes_up"] for r in _records(tmp_path / "packed", "step"))
    assert step_bytes < sum(r["activations_bytes"] for r in _records(tmp_path / "packed", "round")) * 1.1

    again = run(config, tmp_path / "again", progress=False)  # same seed, same config: same result
    assert (again["final_eval_loss"], again["bytes_up"]) == (packed["final_eval_loss"], packed["bytes_up"])


def test_resumed_compressed_run_matches_uninterrupted_run(tiny_llama_dir, corpus_dir, tmp_path):
    """Stochastic quantization draws from the message's identity and checkpoints keep the
    error-feedback residuals, so a resumed run draws and feeds back alike."""
    compression = {"activations": "topk:0.3 > quant:3", "gradients": "quant:4 > zstd", "adapters": "topk:0.5",
                   "error_feedback": True}

    def config(rounds: int):
        return tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", train={"rounds": rounds, "local_steps": 2},
                               compression=compression)

    whole = run(config(3), tmp_path / "whole", progress=False)
    run(config(2), tmp_path / "resumed", progress=False)
    resumed = run(config(3), tmp_path / "resumed", progress=False, resume=True)
    assert resumed["final_eval_loss"] == whole["final_eval_loss"]

    def rounds(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "sim_s")} for r in _records(tmp_path / name, "round")]

    assert rounds("whole") == rounds("resumed")

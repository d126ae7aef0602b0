"""The command line: a run fills its directory and prints a summary; a bad config is one clear error."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from splitfed.cli import app

runner = CliRunner()


def _write_config(path, model_dir, corpus_dir, cuts: str) -> None:
    path.write_text(
        f'protocol = "memsfl"\n[model]\nsource = "{model_dir}"\n[data]\nsource = "{corpus_dir}"\neval_chunks = 4\n'
        f'[lora]\nrank = 2\n[train]\nrounds = 1\nlocal_steps = 1\nbatch_size = 2\nseq_len = 16\n'
        f"[devices]\ncount = 2\ncuts = {cuts}\n"
    )


def test_run_fills_the_run_directory(tiny_llama_dir, corpus_dir, tmp_path):
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[1, 3]")
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "--out", str(out), "--quiet", "--set", "train.local_steps=2"])
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output
    for name in ("config.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/latest", "loss.png", "perplexity.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    required = {"protocol", "rounds", "devices", "base_eval_loss", "base_eval_ppl", "final_eval_loss", "final_eval_ppl",
                "bytes_up", "bytes_down", "peak_mem_device_bytes", "peak_mem_server_bytes",
                "trainable_params_device", "trainable_params_server", "wall_s"}
    assert required <= summary.keys()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [0, 0, 1, 1]  # --set took effect
    assert json.loads((out / "config.json").read_text())["resolved"]["cuts"] == [1, 3]


def test_bad_config_is_one_clear_error(tiny_llama_dir, corpus_dir, tmp_path):
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[2, 9]")
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "devices.cuts: cut 9 of device 1 is past the last layer" in result.output
    assert not (tmp_path / "run").exists()  # nothing created before validation passed


def test_plan_prints_the_table_and_run_follows_the_plan(tiny_llama_dir, corpus_dir, tmp_path):
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[1, 3]")
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", str(config), "--planner", "sft", "--out", str(plan_path), "--set", "seed=3"])
    assert result.exit_code == 0, result.output
    for text in ("calibrating", "plan: sft", "cut", "rank", "power W", "activations", "act. error", "grad. error", "server order",
                 "whole tensor / median over tokens", "predicted: round", "total delay"):
        assert text in result.output, text
    plan = json.loads(plan_path.read_text())
    assert len(plan["cuts"]) == 2 and plan["predicted"]["sim_s"] > 0
    assert len(plan["gradients"]) == len(plan["gradient_errors"]) == 2
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "--plan", str(plan_path), "--out", str(out), "--quiet", "--set", "seed=3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuts"] == plan["cuts"]
    assert summary["sim_s"] == pytest.approx(plan["predicted"]["sim_s"], rel=1e-2)


def test_plan_names_an_infeasible_device(tiny_llama_dir, corpus_dir, tmp_path):
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[1, 3]")
    result = runner.invoke(app, ["plan", str(config), "--out", str(tmp_path / "p.json"),
                                 "--set", "devices.memory_mb=[100.0, 0.0001]", "--set", "devices.cuts=[]"])
    assert result.exit_code == 2
    assert "device 1 (laptop1)" in result.output and "cannot hold one layer" in result.output
    result = runner.invoke(app, ["run", str(config), "--plan", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "plan file not found" in result.output


@pytest.mark.parametrize("option, value", [("--max-error", "-0.1"), ("--max-grad-error", "nan")])
def test_plan_names_a_bad_accuracy_limit(option, value, tiny_llama_dir, corpus_dir, tmp_path):
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[1, 3]")
    result = runner.invoke(app, ["plan", str(config), "--out", str(tmp_path / "p.json"), option, value])
    assert result.exit_code == 2
    assert f"plan option {option.removeprefix('--').replace('-', '_')} must be a finite number >= 0" in result.output


def test_version_and_short_help():
    from splitfed import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"splitfed {__version__}"
    for args in (["-h"], ["run", "-h"], ["serve", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output and "--help" in result.output


def test_help_and_errors_keep_bracketed_text(tiny_llama_dir, corpus_dir, tmp_path):
    result = runner.invoke(app, ["serve", "--help"])
    assert '[runtime] kind = "grpc"' in result.output
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[1, 3]")
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run"), "--quiet",
                                 "--set", 'compression.activations="bogus:1"'])
    assert result.exit_code == 2, result.output
    assert "[center] > [topk:RATIO | topk_token:RATIO]" in " ".join(result.output.split())


def test_overwrite_flag_replaces_a_run_and_quiet_silences_transformers(tiny_llama_dir, corpus_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[1, 3]")
    out = tmp_path / "run"
    try:
        assert runner.invoke(app, ["run", str(config), "--out", str(out), "--quiet"]).exit_code == 0
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    refused = runner.invoke(app, ["run", str(config), "--out", str(out), "--quiet"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    result = runner.invoke(app, ["run", str(config), "--out", str(out), "--quiet", "--overwrite",
                                 "--set", "train.rounds=2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_hsplitlora_run_prints_each_device_configuration_and_the_export(tiny_llama_dir, corpus_dir, tmp_path):
    config = tmp_path / "c.toml"
    _write_config(config, tiny_llama_dir, corpus_dir, "[]")
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run"), "--quiet", "--set",
                                 'protocol="hsplitlora"', "--set", "devices.memory_mb=[1.0, 4.0]", "--set",
                                 'aggregation.method="stack"'])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "device configurations" in result.output and "exported adapter" in result.output
    for u, device in enumerate(summary["configurations"]["devices"]):  # one row per device: budget, cut, ranks
        row = next(line for line in result.output.splitlines() if line.startswith(f"│ {u} "))
        assert f"{device['memory_mb']:g}" in row and f"│ {device['cut']} " in row
    assert (tmp_path / "run" / "merged" / "config.json").is_file()

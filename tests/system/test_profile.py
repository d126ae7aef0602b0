"""`splitfed profile` measures this machine and writes a profile that configs accept in place of a
device class or server name; the clock then prices compute with the measured FLOP/s, unspread."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.config import ConfigError
from splitfed.models.loading import load_model_config
from splitfed.protocols.base import Protocol
from splitfed.registry import protocol_class
from splitfed.run import plan_run
from splitfed.system.clock import Clock
from splitfed.system.costs import head_flops
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def measured(tiny_llama_dir, corpus_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("profile")
    config = directory / "c.toml"
    config.write_text(f'protocol = "sfl"\n[model]\nsource = "{tiny_llama_dir}"\n[data]\nsource = "{corpus_dir}"\n'
                      "[lora]\nrank = 2\n[train]\nbatch_size = 2\nseq_len = 16\n[devices]\ncount = 2\ncuts = [1]\n")
    out = directory / "this-machine.json"
    result = CliRunner().invoke(app, ["profile", str(config), "--out", str(out), "--cuts", "1,2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    return out, json.loads(out.read_text())


def test_profile_times_each_cut_and_derives_flops(measured):
    _, profile = measured
    assert [s["cut"] for s in profile["stages"]] == [1, 2]
    for stage in profile["stages"]:
        assert stage["forward_s"] > 0 and stage["backward_s"] > 0
        assert stage["flop_per_s"] == pytest.approx(stage["flops"] / (stage["forward_s"] + stage["backward_s"]))
        assert stage["saved_activation_bytes"] > 0
    assert profile["stages"][1]["flops"] > profile["stages"][0]["flops"]  # two layers cost more than one
    assert profile["flops"] > 0 and profile["memory_bytes"] > 0 and "not measured" in profile["radio"]
    head = profile["head"]  # the LM head and loss alone: a last stage without layers, fed hidden states
    assert head["forward_s"] > 0 and head["backward_s"] > 0
    assert head["flop_per_s"] == pytest.approx(head["flops"] / (head["forward_s"] + head["backward_s"]))
    assert profile["head_flops"] == head["flop_per_s"]


def test_profile_of_a_bf16_base(tiny_llama_dir, corpus_dir, tmp_path, measured):
    _, fp32 = measured
    config = tmp_path / "c.toml"
    config.write_text(f'protocol = "sfl"\n[model]\nsource = "{tiny_llama_dir}"\n[data]\nsource = "{corpus_dir}"\n'
                      "[lora]\nrank = 2\n[train]\nbatch_size = 2\nseq_len = 16\n[devices]\ncount = 2\ncuts = [1]\n"
                      '[compute]\ndtype = "bfloat16"\n')
    out = tmp_path / "bf16.json"
    result = CliRunner().invoke(app, ["profile", str(config), "--out", str(out), "--cuts", "1,2", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    profile = json.loads(out.read_text())
    assert (profile["dtype"], profile["device"], fp32["dtype"]) == ("bfloat16", "cpu", "float32")
    for half, full in zip(profile["stages"], fp32["stages"], strict=True):
        assert half["weight_bytes"] * 2 == full["weight_bytes"]
        assert 0 < half["saved_activation_bytes"] < full["saved_activation_bytes"]


def test_a_config_accepts_the_profile_and_the_clock_uses_it(measured, tiny_llama_dir, corpus_dir):
    path, profile = measured
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", system={"device_classes": [str(path)], "server": str(path)})
    plan = plan_run(config)
    cls: type[Protocol] = protocol_class("sfl")
    model_config = load_model_config(config.model.source)
    clock = Clock(config, model_config, cls.topology(config, plan.cuts, model_config.num_hidden_layers))
    assert [d.flops for d in clock.devices] == [profile["flops"]] * config.devices.count  # measured: no spread
    assert clock.server.flops == profile["flops"] and clock.server.memory_bytes == profile["memory_bytes"]
    assert clock.server.head_flops == profile["head_flops"]


def test_the_clock_prices_the_lm_head_at_its_own_speed(measured, tiny_llama_dir, corpus_dir, tmp_path):
    """A last stage's time is its layers at the profile's FLOP/s plus the head at ``head_flops``; other
    stages ignore the head's speed, and a profile without one prices the head like the layers."""
    path, profile = measured
    slow_head = tmp_path / "slow-head.json"
    slow_head.write_text(json.dumps({**profile, "head_flops": profile["flops"] / 4}))
    without = tmp_path / "no-head.json"
    without.write_text(json.dumps({k: v for k, v in profile.items() if k != "head_flops"}))
    model_config = load_model_config(str(tiny_llama_dir))
    seconds = {}
    for name, file in (("slow", slow_head), ("same", without)):
        config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", system={"device_classes": [str(file)], "server": str(file)})
        topology = protocol_class("sfl").topology(config, plan_run(config).cuts, model_config.num_hidden_layers)
        clock = Clock(config, model_config, topology)
        route = topology.routes[0]
        seconds[name] = (clock.stage_s(route.first, 0), clock.stage_s(route.stages[-1], 0))
    head = head_flops(clock.costs, config.train.batch_size, config.train.seq_len)
    assert seconds["slow"][0] == seconds["same"][0]  # the device's first stage has no head
    flops = profile["flops"]
    for slow, same, part in zip(seconds["slow"][1], seconds["same"][1], ("forward", "backward"), strict=True):
        assert slow - same == pytest.approx(getattr(head, part) * (4 / flops - 1 / flops))


@pytest.mark.parametrize("content, expected", [
    ("not json", "profile file .*: Expecting value"),
    ('{"kind": "other"}', "is not a splitfed profile"),
    ('{"kind": "splitfed-profile", "flops": -1, "memory_bytes": 1, "max_power_w": 1, "distance_m": [1, 2]}',
     "flops is -1; allowed: a number > 0"),
    ('{"kind": "splitfed-profile", "flops": 1, "memory_bytes": 1, "max_power_w": 1, "distance_m": [3, 2]}',
     "distance_m is \\[3, 2\\]"),
    ('{"kind": "splitfed-profile", "flops": 1, "memory_bytes": 1, "max_power_w": 1, "distance_m": [1, 2], '
     '"head_flops": 0}', "head_flops is 0; allowed: a number > 0, or absent"),
])
def test_a_bad_profile_file_is_refused_at_load(tiny_llama_dir, corpus_dir, tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", system={"device_classes": [str(path)]})


def test_a_missing_profile_file_names_the_field(tiny_llama_dir, corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="system.server.*profile file .*missing.json"):
        tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", system={"server": str(tmp_path / "missing.json")})

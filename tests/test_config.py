"""Bad configs get one clear error naming the field and what is allowed, before any model loads."""

from __future__ import annotations

import pytest

from splitfed.config import ConfigError, load_config, parse_config
from splitfed.run import plan_run
from tests.conftest import tiny_run_config


@pytest.mark.parametrize(
    ("protocol", "sections", "expected"),
    [
        ("sfl", {"devices": {"count": 2, "cuts": [6]}}, r"devices.cuts: cut 6 of device 0 is past the last layer.*allowed 1..5"),
        ("memsfl", {"devices": {"count": 2, "cuts": [0]}}, r"devices.cuts: devices.cuts must be >= 1"),
        ("sfl", {"lora": {"rank": 0}}, r"lora.rank: Input should be greater than or equal to 1"),
        ("memsfl", {"devices": {"count": 2, "cuts": [2], "ranks": [4, 0]}}, r"devices.ranks: devices.ranks must be >= 1"),
        ("splitfed-v9", {}, r"protocol: unknown protocol 'splitfed-v9'; allowed: centralized, fedlora, hsplitlora, memsfl, sfl, sflv1"),
        ("sfl", {"model": {"source": "no-such-model"}}, r"model.source='no-such-model' is not a shipped model.*shipped: smollm2"),
        ("sfl", {"data": {"source": "/nonexistent/data.jsonl"}}, r"data.source"),
        ("memsfl", {"devices": {"count": 2, "cuts": [], "memory_mb": [0.01]}}, r"devices.memory_mb: device 0 has 0.01 MB, which cannot hold even one layer"),
        ("sfl", {"devices": {"count": 2, "cuts": [1, 2]}}, r"protocol 'sfl' uses one cut for all devices"),
        ("memsfl", {"devices": {"count": 2, "cuts": []}}, r"needs devices.cuts or devices.memory_mb"),
        ("sfl", {"train": {"devices_per_round": 9}}, r"train.devices_per_round=9 exceeds devices.count=4"),
        ("sfl", {"train": {"optimizer": "adam9"}}, r"train.optimizer: Input should be 'adamw' or 'sgd'"),
        ("sfl", {"train": {"bogus": 1}}, r"train.bogus: unknown field"),
        ("sfl", {"compression": {"activations_per_device": ["fp16"]}},
         r"compression.activations_per_device lists 1 pipelines for devices.count=4"),
        ("sfl", {"compression": {"gradients_per_device": ["fp16", "quant:99", "none", "none"]}},
         r"compression.gradients_per_device: entry 1 \(device 1\)"),
    ],
)
def test_bad_config_names_the_field(tiny_llama_dir, corpus_dir, protocol, sections, expected):
    with pytest.raises(ConfigError, match=expected):
        plan_run(tiny_run_config(tiny_llama_dir, corpus_dir, protocol, **sections))


def test_memory_budget_gives_per_device_cuts(tiny_llama_dir, corpus_dir):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "memsfl", devices={"count": 3, "cuts": [], "memory_mb": [0.6, 1.5, 50]})
    cuts = plan_run(config).cuts
    assert cuts[0] < cuts[1] <= cuts[2] == 5  # bigger budget, deeper cut; capped below the last layer


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('protocol = "sfl"\n[devices]\ncuts = [2]\n')
    config = load_config(path, ["train.rounds=7", "devices.cuts=[3]", "model.source=smollm2"])
    assert (config.train.rounds, config.devices.cuts) == (7, [3])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(path, ["train.rounds"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    path.write_text("protocol = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="lora.targets"):
        parse_config({"lora": {"targets": []}, "devices": {"cuts": [1]}})

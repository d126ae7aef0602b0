"""Predicted peak memory within 20% of what the roles measure, on tiny models and on SmolLM2."""

from __future__ import annotations

import pytest

from splitfed.config import parse_config
from splitfed.models.loading import WEIGHTS_FILE, load_model_config, resolve_source
from splitfed.run import plan_run, run
from splitfed.registry import protocol_class
from tests.conftest import tiny_run_config

CASES = [
    ("sfl", {"devices": {"count": 3, "cuts": [2]}}),
    ("sfl", {"devices": {"count": 3, "cuts": [3]}, "sfl": {"mode": "sequential"}}),
    ("memsfl", {"devices": {"count": 3, "cuts": [1, 2, 4], "ranks": [2, 4, 8]}, "aggregation": {"method": "zeropad"}}),
    ("sflv1", {"devices": {"count": 2, "cuts": [2, 3]}}),
    ("fedlora", {"devices": {"count": 2, "cuts": []}}),
]


def _check(config, summary) -> None:
    predicted = protocol_class(config.protocol).predicted_memory(config, load_model_config(config.model.source),
                                                                 summary["cuts"])
    for key, value in predicted.items():
        assert value == pytest.approx(summary[key], rel=0.2, abs=1), key


@pytest.mark.parametrize("protocol, sections", CASES)
def test_predicted_peak_memory_matches_measured_tiny(tiny_model_dir, corpus_dir, tmp_path, protocol, sections):
    config = tiny_run_config(tiny_model_dir, corpus_dir, protocol, train={"rounds": 1, "local_steps": 1}, **sections)
    _check(config, run(config, tmp_path, progress=False))


@pytest.mark.skipif(not (resolve_source("smollm2")[0] / WEIGHTS_FILE).is_file(), reason="SmolLM2 not prepared")
def test_predicted_peak_memory_matches_measured_smollm2(tmp_path):
    config = parse_config({
        "protocol": "memsfl",
        "data": {"documents": ["hamlet", "lear"], "max_train_chunks_per_device": 4, "eval_chunks": 2},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 2, "seq_len": 64},
        "devices": {"count": 2, "cuts": [2, 6]},
    })
    plan_run(config)
    _check(config, run(config, tmp_path, progress=False))

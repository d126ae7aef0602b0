"""Shared by the planner tests: the sft ladder's codec errors measured on the tiny Llama."""

from __future__ import annotations

import pytest

from splitfed.planning.calibrate import CodecCalibration, calibrate_codecs
from splitfed.planning.sft import LADDER
from tests.conftest import tiny_run_config


@pytest.fixture(scope="session")
def tiny_calibration(tiny_llama_dir, corpus_dir) -> CodecCalibration:
    """Every lossy rung of sft's ladder, both streams, at every cut of the tiny Llama (seed 0, batch 4 x 32):
    the planner tests plan for its architecture and share this one measurement."""
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl")
    return calibrate_codecs(config, [spec for spec in LADDER if spec != "none"], cuts=range(1, 6))

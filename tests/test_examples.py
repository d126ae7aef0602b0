"""Every shipped example config loads and plans (cuts, model and data checked) without loading weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfed.config import load_config
from splitfed.run import plan_run

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_plans(path):
    plan = plan_run(load_config(path))
    assert plan.documents
    if plan.config.devices.cuts or plan.config.devices.memory_mb:
        assert len(plan.cuts) == plan.config.devices.count

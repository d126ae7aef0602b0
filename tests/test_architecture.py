"""The architecture is kept by tests: nothing outside ``protocols/`` names a protocol, and
budgets give a shared-server protocol one common cut."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import splitfed
from splitfed.config import parse_config
from splitfed.models.loading import WEIGHTS_FILE, resolve_source
from splitfed.registry import protocol_names

SOURCE = Path(splitfed.__file__).parent
ALLOWED = {SOURCE / "registry.py"}
RECORDS = {("planning/convergence.py", "sfl")}
"""Protocol names as data, not switches: the workload ``FITTED`` was measured on."""


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_protocol_name_outside_protocols():
    names = set(protocol_names())
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.is_relative_to(SOURCE / "protocols") or path in ALLOWED:
            continue
        where = path.relative_to(SOURCE).as_posix()
        found += [f"{where}:{line}: {value!r}" for line, value in _string_constants(path)
                  if value in names and (where, value) not in RECORDS]
    assert not found, "protocol names outside protocols/ (switch on the protocol's declarations instead):\n" + \
        "\n".join(found)


def test_the_scan_finds_a_protocol_switch(tmp_path):
    """The scan above is not vacuous: a name switch like the ones it replaced is found."""
    sample = tmp_path / "sample.py"
    sample.write_text('def together(config):\n    return config.protocol == "sfl"\n')
    assert (2, "sfl") in _string_constants(sample)


@pytest.mark.skipif(not (resolve_source("smollm2")[0] / WEIGHTS_FILE).is_file(), reason="SmolLM2 not prepared")
def test_budgets_give_a_shared_server_protocol_one_common_cut():
    from splitfed.run import plan_run

    devices = {"count": 2, "memory_mb": [300.0, 900.0]}
    shared = plan_run(parse_config({"protocol": "sfl", "devices": devices})).cuts
    own = plan_run(parse_config({"protocol": "memsfl", "devices": devices})).cuts
    assert own[0] < own[1]  # each device alone: the bigger budget holds more layers
    assert shared == [own[0], own[0]]  # one cut: the deepest that fits every device

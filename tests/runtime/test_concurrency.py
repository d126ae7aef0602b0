"""Parallel means parallel: in a gRPC sfl run the device processes compute the forward passes of
one step at the same time (each process records when it served each request), and the result
equals the in-process run's; forced one at a time, the windows never overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitfed.config import load_config
from splitfed.run import run
from tests.runtime.test_grpc_processes import DEVICES, assert_same_adapters, free_port, serve_with_devices, write_config

pytestmark = pytest.mark.slow  # real processes


def _forward_windows(trace_dir: Path) -> dict[tuple[int, int], list[tuple[float, float]]]:
    """(round, step) -> each device's (start, end) of its forward pass, as the device processes recorded them."""
    windows: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for path in sorted(trace_dir.glob("device*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["op"] == "forward":
                windows.setdefault((entry["round"], entry["step"]), []).append((entry["start"], entry["end"]))
    return windows


def _all_overlap(windows: list[tuple[float, float]]) -> bool:
    return max(start for start, _ in windows) < min(end for _, end in windows)


def _serve(config_path: Path, out: Path, trace: Path, concurrent: bool) -> dict:
    """Server and device processes; the devices read ``runtime.trace_dir`` from the config file."""
    lines = [line for line in config_path.read_text().splitlines() if not line.startswith(("trace_dir", "address"))]
    config_path.write_text("\n".join([*lines, f'trace_dir = "{trace}"', f'address = "127.0.0.1:{free_port()}"', ""]))
    return serve_with_devices(config_path, out, concurrent=concurrent)


def test_device_forwards_of_a_step_overlap_and_results_match_in_process(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    # Deep cut, longer sequences, larger batches: a forward pass (~50 ms) outlasts the spread of the
    # requests' arrival (up to ~20 ms on 2 cores), so the overlap is seen whenever it happens.
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[5]", free_port())
    config_path.write_text(config_path.read_text().replace("seq_len = 32", "seq_len = 128")
                           .replace("batch_size = 4", "batch_size = 12"))
    summary = _serve(config_path, tmp_path / "parallel", tmp_path / "trace-parallel", concurrent=True)
    windows = _forward_windows(tmp_path / "trace-parallel")
    assert len(windows) == 4 and all(len(w) == DEVICES for w in windows.values())  # 2 rounds x 2 steps
    overlapping = [key for key, w in windows.items() if _all_overlap(w)]
    assert len(overlapping) >= 3, windows  # all four forwards run at once (scheduling noise may miss one)

    local = run(load_config(config_path), tmp_path / "inproc", progress=False)
    assert_same_adapters(tmp_path / "parallel", tmp_path / "inproc")
    assert summary["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)

    _serve(config_path, tmp_path / "serial", tmp_path / "trace-serial", concurrent=False)
    for w in _forward_windows(tmp_path / "trace-serial").values():
        ordered = sorted(w)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ordered, ordered[1:])), ordered

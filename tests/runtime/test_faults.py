"""Fault scenarios with real processes on loopback: a device dies and rejoins, the server
dies and resumes (hostile peers: test_hardening.py and test_fuzz.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import load_config
from splitfed.run import run
from splitfed.deploy import serve
from tests.runtime.test_grpc_processes import DEVICES, free_port, start_devices, write_config

pytestmark = pytest.mark.slow  # real processes


def _records(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _serve_in_thread(config_path, out, overrides=()):
    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = serve(load_config(config_path, ['runtime.kind="grpc"', *overrides]), out, progress=False)
        except BaseException as error:  # surfaced by the test below
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("stack", [False, True], ids=["fedavg", "stack"])
def test_killed_device_is_dropped_and_rejoins_after_restart(tiny_llama_dir, corpus_dir, tmp_path, stack):
    """quorum = 1: the round the device dies in is retried once the restarted device is back,
    so the test does not depend on how fast a process starts on a busy machine. With ``stack``
    the restarted process has a fresh base: it is sent every merge so far."""
    config_path = tmp_path / "config.toml"
    cuts, extra = ("[1, 2, 4]\nranks = [2, 4, 8, 4]", '[aggregation]\nmethod = "stack"\n') if stack else ("[1, 2, 4]", "")
    write_config(config_path, tiny_llama_dir, corpus_dir, "memsfl", cuts, free_port(), extra)
    devices = start_devices(config_path, DEVICES)
    metrics = tmp_path / "run" / "metrics.jsonl"
    overrides = ["train.rounds=4", "train.local_steps=3", "runtime.quorum=1.0", "runtime.request_timeout_s=20"]
    thread, result = _serve_in_thread(config_path, tmp_path / "run", overrides)
    try:
        _wait_until(lambda: any(r.get("round") == 1 and r["kind"] == "step" for r in _records(metrics)), 180, "round 1")
        devices[3].send_signal(signal.SIGKILL)  # mid-round
        devices[3].wait(timeout=30)
        devices[3] = subprocess.Popen(
            [sys.executable, "-m", "splitfed.cli", "device", str(config_path), "--id", "3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        thread.join(timeout=600)
        assert not thread.is_alive() and "error" not in result, result.get("error")
    finally:
        for process in devices:
            process.kill()
    records = _records(metrics)
    kinds = [(r["kind"], r.get("device")) for r in records]
    drop, retry, rejoin = kinds.index(("drop", 3)), kinds.index(("round_retry", None)), kinds.index(("rejoin", 3))
    assert records[drop]["round"] >= 1 and drop < retry < rejoin
    retried = records[retry]["round"]  # its round record counts the steps of the attempt that completed it
    final_steps = [r for r in records[retry + 1:] if r["kind"] == "step" and r["round"] == retried]
    round_record = next(r for r in records if r["kind"] == "round" and r["round"] == retried)
    assert round_record["loss"] == pytest.approx(sum(r["loss"] for r in final_steps) / len(final_steps))
    assert round_record["tokens"] == sum(r["tokens"] for r in final_steps)
    assert result["summary"]["rounds"] == 4
    assert {r["device"] for r in records if r["kind"] == "step" and r["round"] == 3} == {0, 1, 2, 3}


def kill_server_after_round_two_and_resume(config_path, out, processes: list[subprocess.Popen],
                                           overrides: list[str]) -> None:
    """`splitfed serve` into ``out``, SIGKILLed once round 2's checkpoint is written, restarted with --resume;
    waits until it and ``processes`` (its devices, edges) have finished cleanly."""

    def start_server(*extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "splitfed.cli", "serve", str(config_path), "--out", str(out), "--quiet",
                   *overrides, *extra]
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    server = start_server()
    try:
        latest = out / "checkpoints" / "latest"
        _wait_until(lambda: latest.exists() and latest.read_text().strip() == "round-0001", 300, "round 2 checkpoint")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        server = start_server("--resume")
        assert server.wait(timeout=300) == 0, server.stderr.read().decode()[-3000:]
        for process in processes:
            assert process.wait(timeout=60) == 0, process.stderr.read().decode()[-2000:]
    finally:
        for process in [server, *processes]:
            process.kill()


def test_server_killed_after_round_two_resumes_to_the_same_adapters(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "memsfl", "[1, 2, 4]", free_port())
    overrides = ["--set", "train.rounds=4"]
    out = tmp_path / "run"
    kill_server_after_round_two_and_resume(config_path, out, start_devices(config_path, DEVICES), overrides)
    uninterrupted = tmp_path / "whole"
    run(load_config(config_path, ["train.rounds=4"]), uninterrupted, progress=False)
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    expected = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)

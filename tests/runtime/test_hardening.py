"""Each way a peer or the network broke a run before (issue 10), reproduced with real processes
and shown handled: the server and devices stay up or exit with one clear line, honest devices
finish, and what is exported loads in PEFT."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitfed.config import load_config
from splitfed.deploy import transport_settings
from splitfed.runtime.grpc.transport import LinkServer
from splitfed.wire.messages import Message
from tests.runtime.attack import AttackerDevice
from tests.runtime.test_grpc_processes import free_port, write_config

pytestmark = pytest.mark.slow  # real processes

CLI = [sys.executable, "-m", "splitfed.cli"]


def _device(config_path, device: int, log_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "device", str(config_path), "--id", str(device), *extra],
                            stdout=subprocess.DEVNULL, stderr=log_path.open("w"))


def _server(config_path, out, log_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "serve", str(config_path), "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.DEVNULL, stderr=log_path.open("w"))


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _one_error_line(log_path) -> str:
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def test_authenticated_device_can_neither_crash_the_server_nor_corrupt_the_adapter(tiny_llama_dir, corpus_dir, tmp_path):
    """Device 2 holds a valid token and lies: a negative sample count, a rank-64 adapter from a rank-4
    device, a checkpoint state whose meta is not JSON. The server refuses each reply, drops device 2
    from that round, finishes; the exported adapter is rank 4 and loads in PEFT."""
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[2]", free_port(), devices=3)
    config = load_config(config_path, ["train.rounds=3"])
    server = _server(config_path, tmp_path / "run", tmp_path / "server.log", "--set", "train.rounds=3")
    honest = [_device(config_path, u, tmp_path / f"device{u}.log") for u in (0, 1)]

    def tamper(request: Message, reply: Message) -> Message | None:
        if reply.kind == "adapter_upload" and reply.round == 0:
            return Message(reply.kind, reply.sender, reply.round, reply.step, reply.tensors, {"num_samples": -5})
        if reply.kind == "adapter_upload" and reply.round == 1:
            rank_64 = {k: torch.randn(64, v.shape[1]) if ".lora_A." in k else torch.randn(v.shape[0], 64)
                       for k, v in reply.tensors.items()}
            return Message(reply.kind, reply.sender, reply.round, reply.step, rank_64, reply.values)
        if reply.kind == "role_state":
            return Message(reply.kind, reply.sender, reply.round, reply.step, reply.tensors, {"meta": "{not json"})
        return None

    try:
        attacker = AttackerDevice(config, 2, tamper).start()
        assert server.wait(timeout=400) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for process in honest:
            assert process.wait(timeout=60) == 0
    finally:
        for process in [server, *honest]:
            process.kill()
    drops = {r["round"]: r["reason"] for r in _records(tmp_path / "run" / "metrics.jsonl")
             if r["kind"] == "drop" and r["device"] == 2}
    assert "num_samples=-5" in drops[0] and "has shape (64," in drops[1], drops
    assert any("meta is not JSON" in reason for reason in attacker.errors), attacker.errors[:5]

    from peft import PeftModel

    from splitfed.models.loading import load_model

    loaded = PeftModel.from_pretrained(load_model(str(tiny_llama_dir)), str(tmp_path / "run" / "adapter"))
    ranks = {m.r["default"] for m in loaded.modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks == {4} and loaded.peft_config["default"].r == 4
    assert all(torch.isfinite(p).all() for n, p in loaded.named_parameters() if "lora_" in n)


def _device_under_a_test_server(tmp_path, tiny_llama_dir, corpus_dir, *extra: str):
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[2]", free_port(), devices=1)
    config = load_config(config_path)
    server = LinkServer(config.runtime.address, {0: "token-0"}, transport_settings(config.runtime))
    device = _device(config_path, 0, tmp_path / "device.log", *extra)
    return config, server, device


def test_malformed_server_frames_are_answered_and_a_valid_stop_ends_the_device(tiny_llama_dir, corpus_dir, tmp_path):
    """A server frame whose header has ``"values": 5`` once left the device hanging (its reader thread died)."""
    from safetensors.torch import save as save_tensors

    _, server, device = _device_under_a_test_server(tmp_path, tiny_llama_dir, corpus_dir)
    try:
        assert server.wait_for([0], timeout=120) == [0]
        session = server.session(0)
        header = {"kind": "call", "sender": "server", "round": 0, "step": 0, "values": {"op": "report"}}
        for broken, expected in [({**header, "values": 5}, "values is a int"),
                                 ({**header, "kind": ["call"]}, "unknown message kind"),
                                 ([header], "header is a list")]:
            reply, _, _ = session.exchange(save_tensors({}, metadata={"splitfed": json.dumps(broken)}), timeout=30)
            assert reply.kind == "error" and expected in reply.values["reason"], reply.values
        nested = save_tensors({}, metadata={"splitfed": "[" * 100_000 + "]" * 100_000})
        assert session.exchange(nested, timeout=30)[0].kind == "error"
        reply, _, _ = session.request(Message("call", "server", 0, 0, values={"op": "report"}), timeout=30)
        assert reply.kind == "ack" and reply.values["trainable_params"] > 0  # still serving
        session.send(Message("call", "server", 0, 0, values={"op": "stop"}))
        assert device.wait(timeout=10) == 0
    finally:
        device.kill()
        server.stop(grace=0)


def test_refused_device_exits_at_once_with_one_clear_line(tiny_llama_dir, corpus_dir, tmp_path):
    """A wrong token once made the device redial ~1,100 times a minute, forever."""
    _, server, device = _device_under_a_test_server(tmp_path, tiny_llama_dir, corpus_dir, "--token", "wrong")
    try:
        assert device.wait(timeout=120) == 1
        time.sleep(1)
    finally:
        device.kill()
        server.stop(grace=0)
    line = _one_error_line(tmp_path / "device.log")
    assert "refused this device" in line and "UNAUTHENTICATED" in line and "runtime.tokens[0]" in line
    assert server.rejected.count == 1  # no redial


def test_device_gives_up_after_connect_timeout_when_its_server_vanishes(tiny_llama_dir, corpus_dir, tmp_path):
    """The server goes away without saying stop: the device redials with backoff, then exits with one line."""
    _, server, device = _device_under_a_test_server(tmp_path, tiny_llama_dir, corpus_dir,
                                                    "--set", "runtime.connect_timeout_s=4")
    try:
        assert server.wait_for([0], timeout=120) == [0]
        server.stop(grace=0)
        vanished = time.monotonic()
        assert device.wait(timeout=60) == 1
        waited = time.monotonic() - vanished
    finally:
        device.kill()
    assert 3.5 < waited < 20, waited
    line = _one_error_line(tmp_path / "device.log")
    assert "not reachable for 4 s (runtime.connect_timeout_s)" in line


def test_device_with_no_server_and_serve_on_a_busy_port_are_one_line_each(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    port = free_port()
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[2]", port, devices=1)
    device = _device(config_path, 0, tmp_path / "device.log", "--set", "runtime.connect_timeout_s=2")
    busy = LinkServer(f"127.0.0.1:{port + 1 if port < 65000 else port - 1}", {0: "t"})
    try:
        assert device.wait(timeout=120) == 1
        serve = subprocess.run([*CLI, "serve", str(config_path), "--out", str(tmp_path / "run"),
                                "--set", f'runtime.address="127.0.0.1:{busy.port}"'],
                               capture_output=True, text=True, timeout=120)
    finally:
        device.kill()
        busy.stop(grace=0)
    assert "not reachable for 2 s" in _one_error_line(tmp_path / "device.log")
    (tmp_path / "serve.log").write_text(serve.stderr)
    assert serve.returncode == 1
    assert "port is in use" in _one_error_line(tmp_path / "serve.log")


FLOOD_WORKER = Path(__file__).resolve().parents[2] / "bench" / "hardening.py"


def start_flood(address: str, processes: int = 2, threads: int = 10) -> list[subprocess.Popen]:
    """The benchmark's flood (bench/hardening.py): clients re-opening refused streams (wrong token) as fast as
    they can, until their stdin closes; each process then prints how many it opened."""
    return [subprocess.Popen([sys.executable, str(FLOOD_WORKER), "--flood-worker", address, str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(processes)]


def stop_flood(workers: list[subprocess.Popen]) -> int:
    return sum(int(worker.communicate(input="", timeout=60)[0].strip() or 0) for worker in workers)


def test_server_exits_soon_after_its_summary_under_a_connection_flood(tiny_llama_dir, corpus_dir, tmp_path):
    """The server once stayed alive after writing summary.json while refused connections kept coming."""
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[2]", free_port(), devices=2)
    config = load_config(config_path)
    server = _server(config_path, tmp_path / "run", tmp_path / "server.log")
    deadline = time.monotonic() + 120
    while "listening on" not in (tmp_path / "server.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = start_flood(config.runtime.address)  # from before the devices join to the end
    devices = [_device(config_path, u, tmp_path / f"device{u}.log") for u in (0, 1)]
    summary = tmp_path / "run" / "summary.json"
    try:
        while server.poll() is None and not summary.exists():
            time.sleep(0.05)
        written = time.monotonic()
        code = server.wait(timeout=30)
        exited = time.monotonic() - written
    finally:
        opened = stop_flood(workers)
        for process in [server, *devices]:
            process.kill()
    assert code == 0 and exited < 10, exited
    assert opened > 20
    log = (tmp_path / "server.log").read_text()
    sampled = [line for line in log.splitlines() if "connection: refused:" in line]
    refused = int(re.search(r"(\d+) connections were refused", log).group(1))
    assert refused > 20 and 1 <= len(sampled) <= 10, log[-2000:]  # a sample, not one line per refused connection

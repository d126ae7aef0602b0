"""Schema fuzzing over real gRPC streams, both directions (issue 10).

Bad messages generated from the schemas (tests/wire/fuzz.py) are sent by an authenticated
peer: to a server process by a device that otherwise answers honestly, and to device
processes by a server that otherwise runs the protocol honestly. The peer under test answers
every one with an error, stays up, and the run ends with the same adapters as an unattacked
in-process run."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest

from splitfed.config import load_config
from splitfed.deploy import message_bounds, remote_devices, transport_settings
from splitfed.run import run
from splitfed.runtime.grpc.frames import HEADER
from splitfed.runtime.grpc.transport import GrpcTransport, LinkServer
from splitfed.wire.messages import KINDS, MessageError, decode
from tests.runtime.attack import AttackerDevice
from tests.runtime.test_grpc_processes import assert_same_adapters, free_port, write_config
from tests.wire.fuzz import generate

pytestmark = pytest.mark.slow  # real processes

PER_DIRECTION = 1200


def _devices(config_path, ids, tmp_path) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "splitfed.cli", "device", str(config_path), "--id", str(u)],
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / f"device{u}.log").open("w"))
            for u in ids]


def _frame_garbage(rng: random.Random) -> list[bytes]:
    """Frames that never make a message: too short, without their start, out of order, over the size limit."""
    return [b"\x00" * rng.randint(0, 23), HEADER.pack(5, 0, 1, 3) + b"y",
            HEADER.pack(6, 0, 0, 2) + b"a", HEADER.pack(7, 0, 1, 2) + b"b",
            HEADER.pack(8, 0, 0, 3) + b"x" * (700 << 10), HEADER.pack(8, 0, 1, 3) + b"x" * (700 << 10)]


def test_server_process_refuses_every_fuzzed_message_and_trains_as_if_unattacked(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[2]", free_port(), devices=3,
                 extra="max_message_mb = 1\n")
    config = load_config(config_path)
    server = subprocess.Popen([sys.executable, "-m", "splitfed.cli", "serve", str(config_path), "--out",
                               str(tmp_path / "grpc"), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"))
    honest = _devices(config_path, (0, 1), tmp_path)
    try:
        attacker = AttackerDevice(config, 2)
        bounds = attacker.hosted.bounds
        payloads = generate(PER_DIRECTION, bounds, seed=1, sender="device2")
        rng = random.Random(2)
        sent = {"payloads": 0, "frames": 0}

        def flood_then_answer(request, reply):
            """Before each honest reply: the next slice of the flood, some as stale replays of old request ids."""
            batch = payloads[sent["payloads"]: sent["payloads"] + 150]
            for _, payload in batch:
                stale = rng.choice(attacker.answered) if attacker.answered and rng.random() < 0.25 else 0
                attacker.inject(payload, reply_to=stale)
            sent["payloads"] += len(batch)
            if sent["frames"] < 60:
                for frame in _frame_garbage(rng):
                    attacker.inject_frame(frame)
                    sent["frames"] += 1
            return None

        attacker.tamper = flood_then_answer
        attacker.start()
        assert server.wait(timeout=500) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for process in honest:
            assert process.wait(timeout=60) == 0
    finally:
        for process in [server, *honest]:
            process.kill()
    assert sent["payloads"] == PER_DIRECTION
    refused = len(attacker.errors)
    # Every message answered (a frame that starts a message but never completes it makes none).
    assert refused >= PER_DIRECTION + sent["frames"] // 2, (refused, sent)
    schema_reasons = [e for e in attacker.errors if "also:" in e]  # the screen ran each kind's schema
    assert len(schema_reasons) > 100 and any("num_samples" in e for e in schema_reasons)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    run(load_config(config_path), tmp_path / "inproc", progress=False)
    assert_same_adapters(tmp_path / "grpc", tmp_path / "inproc")


class FuzzingTransport(GrpcTransport):
    """A server that, before each honest request to a device (once it knows the device's adapter), sends it
    bad messages; each must come back as an error answer."""

    def __init__(self, server: LinkServer, bounds, devices: int, per_request: int) -> None:
        super().__init__(server)
        self.bounds = bounds
        self.per_request = per_request
        self.budget = PER_DIRECTION // devices
        self.sent = dict.fromkeys(range(devices), 0)
        self.answers = {u: Counter() for u in range(devices)}
        self._adapters: dict[int, dict] = {}

    def request(self, device, message, timeout_s):
        """Requests to one device come one at a time (from the protocol's request threads): no lock needed."""
        if device in self._adapters and self.sent[device] < self.budget:
            session = self._session(device)
            bounds = replace(self.bounds, adapter=self._adapters[device])
            count = min(self.per_request, self.budget - self.sent[device])
            seed = device * 1000 + self.sent[device]
            for _, payload in generate(count, bounds, seed=seed, sender="server"):
                if _is_error_notice(payload):  # a device answers no error notice, by design
                    continue
                reply, _, _ = session.exchange(payload, timeout_s)
                self.answers[device][reply.kind] += 1
                self.sent[device] += 1
        if message.kind == "adapter_download":
            self._adapters[device] = {k: tuple(v.shape) for k, v in message.tensors.items()}
        return super().request(device, message, timeout_s)


def _is_error_notice(payload: bytes) -> bool:
    try:
        return decode(payload).kind == "error"
    except MessageError:
        return False


def test_device_processes_refuse_every_fuzzed_message_and_train_as_if_unattacked(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "sfl", "[2]", free_port(), devices=2)
    config = load_config(config_path, ['runtime.kind="grpc"'])
    server = LinkServer(config.runtime.address, dict(enumerate(config.runtime.tokens)), transport_settings(config.runtime))
    devices = _devices(config_path, (0, 1), tmp_path)
    try:
        assert server.wait_for([0, 1], timeout=120) == [0, 1]
        transport = FuzzingTransport(server, message_bounds(config), devices=2, per_request=80)
        remote = remote_devices(config, transport)
        server.screen = remote.screen
        try:
            run(config, tmp_path / "grpc", progress=False, remote=remote)
        finally:
            remote.stop_all()
        for process in devices:
            assert process.wait(timeout=60) == 0
    finally:
        server.stop(grace=0)
        for process in devices:
            process.kill()
    print("device-direction fuzz:", transport.sent, dict(transport.answers))
    assert sum(transport.sent.values()) == PER_DIRECTION
    assert all(answers.keys() == {"error"} for answers in transport.answers.values()), transport.answers
    for u in (0, 1):
        assert "Traceback" not in (tmp_path / f"device{u}.log").read_text()
    run(load_config(config_path), tmp_path / "inproc", progress=False)
    assert_same_adapters(tmp_path / "grpc", tmp_path / "inproc")


def test_fuzz_covers_every_kind():
    payloads = generate(PER_DIRECTION, message_bounds_for_coverage(), seed=1)
    kinds = {description.split(":")[0] for description, _ in payloads}
    assert kinds == set(KINDS)


def message_bounds_for_coverage():
    from splitfed.wire.schema import Bounds

    return Bounds(32, 100, 32, 4, adapter={"a.lora_A.weight": (4, 32), "a.lora_B.weight": (32, 4)})

"""The gRPC transport on loopback: framing, admission, chunked payloads, bad frames."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from splitfed.runtime.grpc.frames import HEADER, Assembled, FrameError, Reassembler, split_frames
from splitfed.runtime.grpc.transport import LinkServer, TransportSettings, connect
from splitfed.runtime.remote import DeviceLost
from splitfed.wire.messages import Message, encode

SETTINGS = TransportSettings(chunk_size=64 << 10, max_message_bytes=16 << 20, keepalive_ms=2000)


@pytest.fixture
def server():
    link = LinkServer("127.0.0.1:0", {0: "secret-0", 1: "secret-1"}, SETTINGS)
    yield link
    link.stop(grace=0)


def _address(server) -> str:
    return f"127.0.0.1:{server.port}"


def test_frames_round_trip_and_reject_garbage():
    data = bytes(range(256)) * 1000
    reassembler = Reassembler(max_message_bytes=1 << 20)
    frames = split_frames(7, data, chunk_size=10_000)
    assert [reassembler.feed(f) for f in frames[:-1]] == [None] * (len(frames) - 1)
    assert reassembler.feed(frames[-1]).data == data
    with pytest.raises(FrameError, match="shorter than its 24-byte header"):
        reassembler.feed(b"abc")
    with pytest.raises(FrameError, match="out of order"):
        reassembler.feed(frames[2])
    with pytest.raises(FrameError, match="size limit"):
        Reassembler(max_message_bytes=100).feed(HEADER.pack(1, 0, 0, 1) + b"x" * 101)
    reply = split_frames(8, b"abc", reply_to=7)[0]
    assert Reassembler(1 << 20).feed(reply) == Assembled(b"abc", 8, 7)


def _answer(device, reply: Message) -> None:
    """The device end answers the next request it receives with ``reply``."""
    request = device.receive(timeout=10)
    device.send(reply, reply_to=request.id)


def _request_in_thread(session, message: Message) -> dict:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(reply=session.request(message, timeout=10)))
    thread.start()
    result["thread"] = thread
    return result


def test_authenticated_device_exchanges_large_messages(server):
    device = connect(_address(server), 0, "secret-0", SETTINGS)
    assert server.wait_for([0], timeout=10) == [0]
    hidden = torch.randn(8, 128, 576)  # 2.4 MB: many frames
    pending = _request_in_thread(server.session(0), Message("call", "server", 1, 2, {"hidden": hidden}, {"op": "forward"}))
    message, size, request_id = device.receive(timeout=10)
    assert message.values == {"op": "forward"} and torch.equal(message.tensors["hidden"], hidden)
    device.send(Message("ack", "device0", 1, 2), reply_to=request_id)
    pending["thread"].join(timeout=10)
    reply, sent, received = pending["reply"]
    assert reply.kind == "ack" and sent == size and received == len(encode(Message("ack", "device0", 1, 2)))


@pytest.mark.slow  # waits 16 s
def test_idle_stream_survives_keepalive_pings():
    """A device that waits with no data for several keepalive intervals stays connected (the server
    must accept the pings instead of answering GOAWAY too_many_pings)."""
    settings = TransportSettings(keepalive_ms=1000)
    link = LinkServer("127.0.0.1:0", {0: "t"}, settings)
    try:
        device = connect(_address(link), 0, "t", settings)
        assert link.wait_for([0], timeout=10) == [0]
        for _ in range(2):
            session = link.session(0)
            assert session is not None, "the idle device was disconnected"
            pending = _request_in_thread(session, Message("call", "server", 0, 0, values={"op": "forward"}))
            _answer(device, Message("ack", "device0", 0, 0))
            pending["thread"].join(timeout=10)
            assert pending["reply"][0].kind == "ack"
            time.sleep(8)  # several pings without data
    finally:
        link.stop(grace=0)


@pytest.mark.parametrize(("device", "token", "reason"), [(0, "wrong", "UNAUTHENTICATED"), (5, "secret-0", "PERMISSION_DENIED")])
def test_wrong_token_or_unknown_id_is_refused(server, device, token, reason):
    intruder = connect(_address(server), device, token, SETTINGS)
    with pytest.raises(DeviceLost, match=reason):
        intruder.receive(timeout=10)
    assert server.session(device) is None and server.rejected.count == 1


def test_bad_frame_is_refused_and_cannot_take_the_replys_place(server):
    device = connect(_address(server), 1, "secret-1", SETTINGS)
    server.wait_for([1], timeout=10)
    session = server.session(1)
    pending = _request_in_thread(session, Message("call", "server", 0, 0, values={"op": "report"}))
    request = device.receive(timeout=10)
    device._outbox.put(b"\x00" * 3)  # a malformed frame straight onto the wire
    device.send(Message("ack", "device1", 0, 0), reply_to=request.id + 1000)  # answers nothing outstanding
    error = device.receive(timeout=10).message
    assert error.kind == "error" and "shorter than its 24-byte header" in error.values["reason"]
    assert "unsolicited ack" in device.receive(timeout=10).message.values["reason"]
    device.send(Message("ack", "device1", 0, 0), reply_to=request.id)
    pending["thread"].join(timeout=10)
    assert pending["reply"][0].kind == "ack" and session.refused.count == 2


def test_unsolicited_messages_are_answered_with_errors(server):
    device = connect(_address(server), 0, "secret-0", SETTINGS)
    server.wait_for([0], timeout=10)
    for _ in range(3):
        device.send(Message("ack", "device0", 0, 0))
    device._outbox.put(b"junk")
    replies = [device.receive(timeout=10)[0] for _ in range(4)]
    assert [r.kind for r in replies] == ["error"] * 4
    assert "unsolicited ack" in replies[0].values["reason"] and "header" in replies[3].values["reason"]
    assert server.session(0).refused.count == 4


def _make_certificates(directory) -> dict[str, object]:
    """A CA, a server certificate for 127.0.0.1 and a device certificate, made with openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=splitfed-test-ca")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("device", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (directory / f"{name}.ext").write_text(extra + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {n: directory / n for n in ("ca.pem", "server.pem", "server.key", "device.pem", "device.key")}


def test_mutual_tls_admits_only_devices_with_a_certificate(tmp_path):
    files = _make_certificates(tmp_path)
    server_settings = TransportSettings(tls_cert=files["server.pem"], tls_key=files["server.key"], tls_ca=files["ca.pem"])
    link = LinkServer("127.0.0.1:0", {0: "t0", 1: "t1"}, server_settings)
    try:
        address = f"127.0.0.1:{link.port}"
        with_cert = TransportSettings(tls_ca=files["ca.pem"], tls_cert=files["device.pem"], tls_key=files["device.key"])
        device = connect(address, 0, "t0", with_cert, ready_timeout_s=10)
        assert link.wait_for([0], timeout=10) == [0]
        link.session(0).send(Message("call", "server", 0, 0, values={"op": "forward"}))
        assert device.receive(timeout=10)[0].values["op"] == "forward"
        with pytest.raises(DeviceLost):  # TLS to the right server, but no client certificate
            connect(address, 1, "t1", TransportSettings(tls_ca=files["ca.pem"]), ready_timeout_s=3).receive(timeout=10)
        assert link.session(1) is None
    finally:
        link.stop(grace=0)


def test_device_whose_server_vanishes_mid_request_reconnects_instead_of_crashing(tiny_llama_dir, corpus_dir):
    """The server dies while the device computes its reply: sending it fails, and the device
    goes back to dialing (serve_device returns False) rather than raising out of the process."""
    from splitfed.deploy import message_bounds
    from splitfed.run import build_protocol, plan_run
    from splitfed.runtime.endpoint import HostedDevice, serve_device
    from splitfed.runtime.grpc.transport import Session
    from splitfed.runtime.link import message_codec
    from splitfed.wire.messages import encode
    from tests.conftest import tiny_run_config

    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", devices={"count": 1, "cuts": [2]})
    protocol, _ = build_protocol(plan_run(config), log=lambda record: None)
    session = Session("server", SETTINGS)
    for frame in split_frames(1, encode(Message("call", "server", 0, 0, values={"op": "report"})), SETTINGS.chunk_size):
        session.feed(frame)  # a request arrives ...
    session.close("server killed")  # ... and the stream ends before the reply goes out
    hosted = HostedDevice(0, protocol.workers["device0"].worker, message_bounds(config), frozenset({"server"}))
    assert serve_device(hosted, session, message_codec(config)) is False


def _raw_header(header: object) -> bytes:
    from safetensors.torch import save as save_tensors

    return save_tensors({}, metadata={"splitfed": header if isinstance(header, str) else json.dumps(header)})


def test_malformed_headers_get_short_error_replies_and_the_stream_goes_on(server):
    """Deep nesting, values as a number, kind as a list, a header that is a list, a 900 kB kind: each once
    killed the server's reader thread or came back echoed in full."""
    device = connect(_address(server), 0, "secret-0", SETTINGS)
    server.wait_for([0], timeout=10)
    ack = {"kind": "ack", "sender": "device0", "round": 0, "step": 0}
    payloads = [_raw_header("[" * 100_000 + "]" * 100_000), _raw_header({**ack, "values": 5}),
                _raw_header({**ack, "kind": ["ack"]}), _raw_header([ack]), _raw_header({**ack, "kind": "k" * 900_000})]
    for payload in payloads:
        for frame in split_frames(99, payload, SETTINGS.chunk_size):
            device._outbox.put(frame)
    replies = [device.receive(timeout=10).message for _ in payloads]
    assert [r.kind for r in replies] == ["error"] * len(payloads)
    assert all(len(encode(r)) < 1000 for r in replies), [len(encode(r)) for r in replies]
    session = server.session(0)
    assert session is not None and session.refused.count == len(payloads)
    pending = _request_in_thread(session, Message("call", "server", 0, 0, values={"op": "report"}))
    _answer(device, Message("ack", "device0", 0, 0))
    pending["thread"].join(timeout=10)
    assert pending["reply"][0].kind == "ack"


def test_refused_connections_are_counted_with_a_bounded_sample(server, caplog):
    for attempt in range(60):
        intruder = connect(_address(server), 0, f"wrong-{attempt}", SETTINGS)
        with pytest.raises(DeviceLost):
            intruder.receive(timeout=10)
        assert intruder.credentials_refused
    assert server.rejected.count == 60 and len(server.rejected.sample) == 10
    assert sum("refused" in record.getMessage() for record in caplog.records) == 10


def test_redial_backoff_grows_with_jitter_and_stays_within_the_budget():
    from random import Random

    from splitfed.runtime.grpc.transport import wait_before_redial

    draws = Random(0).random
    delays = [wait_before_redial(attempt, 100.0, draws, base_s=0.001, cap_s=0.05) for attempt in range(8)]
    assert delays[0] < delays[3] < 0.08 and all(0.5 * 0.001 <= d for d in delays)
    assert wait_before_redial(10, 0.002, draws, base_s=1.0) <= 0.002  # never past the remaining budget

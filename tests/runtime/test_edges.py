"""Three tiers as real processes on loopback: a cloud, edge server processes and user processes
(``splitfed serve`` / ``splitfed edge`` / ``splitfed device``) train like the in-process run; edges
run in parallel; a killed edge drops with its users and rejoins; an edge refuses a wrong token."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from splitfed.config import load_config
from splitfed.run import run
from tests.runtime.test_faults import _records, _serve_in_thread, _wait_until, kill_server_after_round_two_and_resume
from tests.runtime.test_grpc_processes import assert_same_adapters, free_port, start_devices, write_config

pytestmark = pytest.mark.slow  # real processes

USERS, EDGES = 4, 2


def write_three_tier(path, model_dir, corpus_dir, extra: str = "") -> None:
    edges = ", ".join(f'"127.0.0.1:{free_port()}"' for _ in range(EDGES))
    tokens = ", ".join(f'"edge-token-{e}"' for e in range(EDGES))
    write_config(path, model_dir, corpus_dir, "splitllm", "[1, 2]", free_port(), devices=USERS,
                 extra=f"edge_addresses = [{edges}]\nedge_tokens = [{tokens}]\n"
                       f"[splitllm]\nedges = {EDGES}\ncloud_cut = 4\n" + extra)


def start_edges(config_path, edges=range(EDGES)) -> dict[int, subprocess.Popen]:
    return {e: subprocess.Popen([sys.executable, "-m", "splitfed.cli", "edge", str(config_path), "--id", str(e)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for e in edges}


def _forward_group_windows(trace_dir) -> dict[tuple[int, int], list[tuple[float, float]]]:
    """(round, step) -> each edge's (start, end) of its forward_group, as the edge processes recorded them."""
    windows: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for path in sorted(trace_dir.glob("edge*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["op"] == "forward_group":
                windows.setdefault((entry["round"], entry["step"]), []).append((entry["start"], entry["end"]))
    return windows


def test_edge_processes_match_in_process_and_run_in_parallel(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    trace = tmp_path / "trace"
    # the users' codecs (and error feedback of the gradients they are sent) run at the edges
    write_three_tier(config_path, tiny_llama_dir, corpus_dir, '[compression]\nactivations = "topk:0.5 > quant:8"\n'
                     'gradients = "quant:8"\nerror_feedback = true\n')
    # longer sequences and batches: an edge's forward (~50 ms) outlasts the spread of the requests' arrival
    config_path.write_text(config_path.read_text().replace("seq_len = 32", "seq_len = 128")
                           .replace("batch_size = 4", "batch_size = 12")
                           .replace("device_threads = 1", f'device_threads = 1\ntrace_dir = "{trace}"'))
    processes = [*start_edges(config_path).values(), *start_devices(config_path, USERS)]
    try:
        thread, result = _serve_in_thread(config_path, tmp_path / "grpc")
        thread.join(timeout=600)
        assert "error" not in result, result.get("error")
        for process in processes:
            assert process.wait(timeout=60) == 0, process.stderr.read().decode()[-2000:]
    finally:
        for process in processes:
            process.kill()
    remote = result["summary"]
    local = run(load_config(config_path), tmp_path / "inproc", progress=False)
    assert_same_adapters(tmp_path / "grpc", tmp_path / "inproc")
    assert remote["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)
    assert remote["sim_s"] == pytest.approx(local["sim_s"], rel=1e-3)  # the same bytes per hop, measured by the edges
    for key in ("peak_mem_edge_bytes", "peak_mem_cloud_bytes", "peak_mem_device_bytes"):
        assert remote[key] == local[key] > 0, key  # each process's meters report what the in-process roles do

    steps = {(r["round"], r["step"], r["device"]): r["bytes_by_hop"]
             for r in _records(tmp_path / "grpc" / "metrics.jsonl") if r["kind"] == "step"}
    wanted = {(r["round"], r["step"], r["device"]): r["bytes_by_hop"]
              for r in _records(tmp_path / "inproc" / "metrics.jsonl") if r["kind"] == "step"}
    assert steps.keys() == wanted.keys()
    for key, hops in steps.items():  # activations and gradients on each hop: the same tensors (headers differ)
        for hop in ("user{0}->edge{1}", "edge{1}->user{0}", "edge{1}->cloud", "cloud->edge{1}"):
            name = hop.format(key[2], key[2] % EDGES)
            assert hops[name] == pytest.approx(wanted[key][name], rel=0.02, abs=300), (key, name)

    windows = _forward_group_windows(trace)
    assert len(windows) == 4 and all(len(w) == EDGES for w in windows.values())  # 2 rounds x 2 steps x 2 edges
    overlapping = [k for k, w in windows.items() if max(a for a, _ in w) < min(b for _, b in w)]
    assert len(overlapping) >= 3, windows  # the edges train at the same time


def test_killed_edge_drops_its_users_and_rejoins_after_restart(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    write_three_tier(config_path, tiny_llama_dir, corpus_dir)
    config_path.write_text(config_path.read_text().replace("rounds = 2", "rounds = 4")
                           .replace("request_timeout_s = 60", "request_timeout_s = 30\nquorum = 1.0"))
    edges = start_edges(config_path)
    users = start_devices(config_path, USERS)
    metrics = tmp_path / "grpc" / "metrics.jsonl"
    try:
        thread, result = _serve_in_thread(config_path, tmp_path / "grpc")
        _wait_until(lambda: any(r["kind"] == "step" for r in _records(metrics)), 300, "the first step")
        edges[1].kill()
        edges[1].wait()
        _wait_until(lambda: any(r["kind"] == "drop" for r in _records(metrics)), 120, "the drop")
        edges[1] = start_edges(config_path, [1])[1]
        thread.join(timeout=600)
        assert "error" not in result, result.get("error")
        for process in [*edges.values(), *users]:
            assert process.wait(timeout=60) == 0, process.stderr.read().decode()[-2000:]
    finally:
        for process in [*edges.values(), *users]:
            process.kill()
    records = _records(metrics)
    drops = [r for r in records if r["kind"] == "drop"]
    assert drops and all(r["device"] % EDGES == 1 for r in drops), drops  # only users behind edge 1
    rejoined = {r["device"] for r in records if r["kind"] == "rejoin"}
    assert {r["device"] for r in drops} <= rejoined
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(sorted(u % EDGES for u in r["devices"]) == [0, 1] for r in rounds)  # quorum 1: both edges finished


def test_edge_refuses_a_user_with_a_wrong_token(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    write_three_tier(config_path, tiny_llama_dir, corpus_dir)
    config_path.write_text(config_path.read_text().replace("connect_timeout_s = 120", "connect_timeout_s = 30"))
    edge = start_edges(config_path, [0])[0]  # no cloud: the edge keeps dialing it, and serves its users meanwhile
    try:
        time.sleep(0.5)
        user = subprocess.run([sys.executable, "-m", "splitfed.cli", "device", str(config_path), "--id", "0",
                               "--token", "not-the-token"], capture_output=True, text=True, timeout=120)
        assert user.returncode != 0
        assert "refused" in user.stderr and "wrong token for device 0" in user.stderr, user.stderr[-2000:]
    finally:
        edge.kill()


def test_cloud_refuses_an_edge_with_a_wrong_token(tiny_llama_dir, corpus_dir, tmp_path):
    """The edge exits at once with one line naming the setting; the cloud never counts it as connected."""
    from splitfed.deploy import cloud_tokens, run_topology
    from splitfed.runtime.grpc.transport import LinkServer

    config_path = tmp_path / "config.toml"
    write_three_tier(config_path, tiny_llama_dir, corpus_dir)
    config = load_config(config_path, ['runtime.kind="grpc"'])
    cloud = LinkServer(config.runtime.address, cloud_tokens(config, run_topology(config)[1]))
    try:
        edge = subprocess.run([sys.executable, "-m", "splitfed.cli", "edge", str(config_path), "--id", "1",
                               "--token", "not-the-token"], capture_output=True, text=True, timeout=120)
        assert edge.returncode == 1
        assert "refused this edge" in edge.stderr and "runtime.edge_tokens[1]" in edge.stderr, edge.stderr[-2000:]
        assert cloud.rejected.count >= 1 and cloud.wait_for([5], timeout=0.1) == []
    finally:
        cloud.stop(grace=0)


def test_each_process_reads_only_what_it_needs(tiny_llama_dir, corpus_dir, tmp_path):
    """An edge loads only its layers and no data; a user with ``--data`` reads only that file (the run's
    data.source may not even exist on its machine)."""
    from splitfed.deploy import host_devices, host_edge

    config_path = tmp_path / "config.toml"
    write_three_tier(config_path, tiny_llama_dir, corpus_dir)
    elsewhere = load_config(config_path, [f'data.source="{tmp_path / "not-on-this-machine"}"'])
    edge = host_edge(elsewhere, 1)
    model = next(iter(edge.worker.slots.values())).stage.model
    real = {name.split(".")[2] for name, p in model.named_parameters() if p.device.type != "meta" and ".layers." in name}
    assert real == {"2", "3"}  # its users (1, 3) have cut 2, the cloud starts at 4: the edge holds layers 2-3 only
    assert not any(p.device.type != "meta" for name, p in model.named_parameters() if "embed" in name)

    own = tmp_path / "mine.txt"
    own.write_text("My own words, never seen by the server. " * 30)
    user = host_devices(elsewhere, [1], data_path=str(own))[1]
    slot = next(iter(user.worker.slots.values()))
    assert 0 < slot.num_samples < len(own.read_text()) // 32 + 2  # the rows of its file, nothing else


def test_cloud_killed_after_round_two_resumes_with_its_edges_to_the_same_adapters(tiny_llama_dir, corpus_dir, tmp_path):
    """The edges and users redial the restarted cloud, which restores every slot's state on the edges."""
    config_path = tmp_path / "config.toml"
    write_three_tier(config_path, tiny_llama_dir, corpus_dir)
    out = tmp_path / "run"
    processes = [*start_edges(config_path).values(), *start_devices(config_path, USERS)]
    kill_server_after_round_two_and_resume(config_path, out, processes, ["--set", "train.rounds=4"])
    uninterrupted = tmp_path / "whole"
    run(load_config(config_path, ["train.rounds=4"]), uninterrupted, progress=False)
    assert_same_adapters(out, uninterrupted)

"""Cost of the real runtimes: gRPC processes and Ray actors vs the in-process runtime.

1. Step time of memsfl with 4 devices on SmolLM2-135M: a gRPC server plus 4 device
   processes on loopback vs everything in one process (same config and seed). Goal <= 1.10x.
2. Tensor transfer throughput over the gRPC transport on loopback: encode, frame, send,
   reassemble and decode an activation-sized message, in MB/s.
3. Ray: round time of memsfl with 32 and 128 simulated devices in 2 Ray host actors vs
   in-process (local Ray on this machine).

    python bench/transport.py
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _report import markdown_table, write_section
from splitfed.config import parse_config
from splitfed.run import run
from splitfed.deploy import serve
from splitfed.runtime.grpc.transport import LinkServer, TransportSettings, connect
from splitfed.wire.messages import Message

MB = 1 << 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def step_times(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[tuple[int, int], float] = {}
    for r in records:
        if r["kind"] == "step" and r["round"] > 0:  # round 0 warms up caches and connections
            by_step[(r["round"], r["step"])] = max(by_step.get((r["round"], r["step"]), 0.0), r["wall_s"])
    return list(by_step.values())


def grpc_vs_inproc(tmp: Path) -> list[list[object]]:
    tree = {
        "protocol": "memsfl",
        "data": {"partition": "iid", "max_train_chunks_per_device": 16, "eval_chunks": 8},
        "train": {"rounds": 4, "local_steps": 3, "batch_size": 4, "seq_len": 128},
        "devices": {"count": 4, "cuts": [2, 4, 6]},
        "runtime": {"address": f"127.0.0.1:{free_port()}", "tokens": [f"t{i}" for i in range(4)]},
    }
    config_path = tmp / "transport.toml"
    config_path.write_text(_toml(tree))
    local = statistics.median(step_times(_run_inproc(tree, tmp / "inproc")))
    devices = [subprocess.Popen([sys.executable, "-m", "splitfed.cli", "device", str(config_path), "--id", str(i)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(4)]
    try:
        serve(parse_config({**tree, "runtime": {**tree["runtime"], "kind": "grpc"}}), tmp / "grpc", progress=False)
    finally:
        for process in devices:
            process.wait(timeout=60)
    remote = statistics.median(step_times(tmp / "grpc"))
    return [["in-process", f"{local:.2f}", "1.00"], ["gRPC, 4 device processes", f"{remote:.2f}", f"{remote / local:.3f}"]]


def _run_inproc(tree: dict, out: Path) -> Path:
    run(parse_config(tree), out, progress=False)
    return out


def _toml(tree: dict) -> str:
    lines = [f'protocol = "{tree["protocol"]}"']
    for section, values in tree.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def grpc_throughput(megabytes: int = 64, repeats: int = 5) -> list[list[object]]:
    settings = TransportSettings(max_message_bytes=(megabytes + 8) * MB)
    server = LinkServer("127.0.0.1:0", {0: "t"}, settings)
    try:
        device = connect(f"127.0.0.1:{server.port}", 0, "t", settings)
        server.wait_for([0], timeout=30)
        session = server.session(0)
        tensor = torch.randn(megabytes * MB // 4)
        rows = []
        for direction in ("device -> server", "server -> device"):
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                if direction == "device -> server":
                    session.expect_reply()
                    device.send(Message("activations", "d", 0, 0, {"hidden": tensor, "attention_mask": tensor[:1].long(),
                                                                   "labels": tensor[:1].long()}))
                    session.receive(timeout=60)
                else:
                    session.send(Message("adapter_download", "s", 0, 0, {"w": tensor}))
                    device.receive(timeout=60)
                times.append(time.perf_counter() - started)
            rows.append([direction, megabytes, f"{megabytes / statistics.median(times):.0f}"])
        return rows
    finally:
        server.stop(grace=0)


def ray_overhead(tmp: Path, counts: list[int]) -> list[list[object]]:
    from splitfed.deploy import run_on_ray

    rows = []
    for count in counts:
        tree = {
            "protocol": "memsfl",
            "data": {"partition": "iid", "max_train_chunks_per_device": 2, "eval_chunks": 4},
            "train": {"rounds": 2, "local_steps": 1, "batch_size": 1, "seq_len": 32},
            "devices": {"count": count, "cuts": [2, 4]},
        }
        local = sum(step_times(_run_inproc(tree, tmp / f"inproc-{count}")))
        ray_tree = {**tree, "runtime": {"kind": "ray", "ray_hosts": 2}}
        run_on_ray(parse_config(ray_tree), tmp / f"ray-{count}", progress=False)
        remote = sum(step_times(tmp / f"ray-{count}"))
        rows.append([count, f"{local:.1f}", f"{remote:.1f}", f"{remote / local:.2f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray-devices", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        step_rows = grpc_vs_inproc(tmp)
        print(step_rows, flush=True)
        throughput_rows = grpc_throughput()
        print(throughput_rows, flush=True)
        ray_rows = ray_overhead(tmp, args.ray_devices)
    body = (
        "**Step time**, memsfl on SmolLM2-135M, 4 devices at cuts 2/4/6, batch 4 x 128 tokens; median over the "
        "steps of rounds 2-4 (round 1 warms up; freshly started device processes slow the first steps "
        "down). Goal: gRPC <= 1.10x in-process.\n\n"
        + markdown_table(["runtime", "step time (s)", "ratio"], step_rows)
        + "\n\n**gRPC transfer throughput** on loopback (encode + 1 MiB frames + reassemble + decode), median of 5.\n\n"
        + markdown_table(["direction", "message (MB)", "MB/s"], throughput_rows)
        + "\n\n**Ray**: memsfl on SmolLM2, batch 1 x 32 tokens, one local step per round; devices in 2 host actors "
        "(local Ray) vs in-process; training time of the second round.\n\n"
        + markdown_table(["devices", "in-process (s)", "Ray (s)", "ratio"], ray_rows)
    )
    write_section("transport", "Runtimes: gRPC and Ray vs in-process (bench/transport.py)", body)


if __name__ == "__main__":
    main()

"""Cost of the real runtimes: gRPC processes and Ray actors vs the in-process runtime.

1. Step time of memsfl with 4 devices on SmolLM2-135M: a gRPC server plus 4 device
   processes on loopback vs everything in one process (same config and seed). Goal <= 1.10x.
2. Tensor transfer throughput over the gRPC transport on loopback: encode, frame, send,
   reassemble and decode an activation-sized message, in MB/s.
3. Ray: round time of memsfl with 32 and 128 simulated devices in 2 Ray host actors vs
   in-process (local Ray on this machine).
4. Concurrency: step time of sfl (parallel) with 4 devices at a deep cut (12 of 30 layers)
   when the server sends its requests to all devices at once vs one at a time (gRPC, 4
   device processes), and with the devices in 2 Ray host actors vs 1; the device traces
   (``runtime.trace_dir``) show how much the devices' forward passes overlap.

    python bench/transport.py                      # all sections
    python bench/transport.py --only concurrency   # section 4 alone (its own part of docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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
    """memsfl step time in-process, over gRPC as deployed (requests to all devices at once), and over
    gRPC with requests one at a time (what the transport alone costs: no device work overlaps the server's)."""
    tree = {
        "protocol": "memsfl",
        "data": {"partition": "iid", "max_train_chunks_per_device": 16, "eval_chunks": 8},
        "train": {"rounds": 4, "local_steps": 3, "batch_size": 4, "seq_len": 128},
        "devices": {"count": 4, "cuts": [2, 4, 6]},
        # 4 device processes share this machine's cores: one torch thread each (runtime.device_threads)
        "runtime": {"tokens": [f"t{i}" for i in range(4)], "device_threads": 1},
    }
    local = statistics.median(step_times(_run_inproc(tree, tmp / "inproc")))
    rows = [["in-process", "everything in one process", f"{local:.2f}", "1.00"]]
    for concurrent, label in ((True, "all at once"), (False, "one at a time")):
        run_tree = {**tree, "runtime": {**tree["runtime"], "address": f"127.0.0.1:{free_port()}"}}
        config_path = tmp / f"transport-{concurrent}.toml"
        config_path.write_text(_toml(run_tree))
        logs = tmp / f"logs-memsfl-{concurrent}"
        devices = _start_devices(config_path, 4, logs)
        try:
            serve(parse_config({**run_tree, "runtime": {**run_tree["runtime"], "kind": "grpc"}}),
                  tmp / f"grpc-{concurrent}", progress=False, concurrent=concurrent)
        finally:
            _wait_devices(devices, logs)
        remote = statistics.median(step_times(tmp / f"grpc-{concurrent}"))
        rows.append(["gRPC, 4 device processes", f"requests {label}", f"{remote:.2f}", f"{remote / local:.3f}"])
    return rows


def _start_devices(config_path: Path, count: int, logs: Path) -> list[subprocess.Popen]:
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, "-m", "splitfed.cli", "device", str(config_path), "--id", str(i)],
                             stdout=subprocess.DEVNULL, stderr=(logs / f"device{i}.log").open("w"))
            for i in range(count)]


def _wait_devices(devices: list[subprocess.Popen], logs: Path) -> None:
    """Wait for the device processes to exit; fail loudly (with their log) if one did not exit cleanly."""
    failed = []
    for i, process in enumerate(devices):
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "killed after 60 s"
        if code != 0:
            failed.append(f"device {i} exited with {code}:\n{(logs / f'device{i}.log').read_text()[-2000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))


def _run_inproc(tree: dict, out: Path) -> Path:
    run(parse_config(tree), out, progress=False)
    return out


def _toml(tree: dict) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in tree.items() if not isinstance(v, dict)]
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
                if direction == "device -> server":  # a small request answered by the large reply
                    reply = Message("activations", "d", 0, 0, {"hidden": tensor, "attention_mask": tensor[:1].long(),
                                                                "labels": tensor[:1].long()})
                    answer = threading.Thread(target=lambda: device.send(reply, reply_to=device.receive(timeout=60).id))
                    answer.start()
                    session.request(Message("call", "server", 0, 0, values={"op": "forward"}), timeout=60)
                    answer.join()
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


# --- 4. concurrency -------------------------------------------------------------------------
CONCURRENCY_DEVICES = 4
CONCURRENCY_TREE = {
    "protocol": "sfl",
    "sfl": {"mode": "parallel"},
    "data": {"partition": "iid", "max_train_chunks_per_device": 8, "eval_chunks": 4},
    "train": {"rounds": 3, "local_steps": 2, "batch_size": 2, "seq_len": 64},
    "devices": {"count": CONCURRENCY_DEVICES, "cuts": [12]},
}


def _union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` (seconds during which at least one of them runs)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def trace_stats(trace_dir: Path) -> dict:
    """Per measured step (round > 0), from the device traces: the forward window (first start to
    last end of the step's device forwards), the mean duration of one forward, the overlap
    (sum of forward durations / time during which at least one forward runs: 1.0 = one at a time,
    4.0 = all four fully together), and the time during which any device request runs; medians."""
    records = [json.loads(line) for path in sorted(trace_dir.glob("*.jsonl")) for line in path.read_text().splitlines()]
    steps: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        if r["round"] > 0 and r["op"] not in ("upload", "adapter_download", "export_state", "report"):
            steps.setdefault((r["round"], r["step"]), []).append(r)
    window, one, overlap, busy = [], [], [], []
    for ops in steps.values():
        forwards = [(r["start"], r["end"]) for r in ops if r["op"] == "forward"]
        if not forwards:
            continue
        window.append(max(e for _, e in forwards) - min(s for s, _ in forwards))
        one.append(statistics.mean(e - s for s, e in forwards))
        overlap.append(sum(e - s for s, e in forwards) / _union(forwards))
        busy.append(_union([(r["start"], r["end"]) for r in ops]))
    if not window:
        raise RuntimeError(f"no forward requests of rounds > 0 in the traces under {trace_dir}")
    return {"window": statistics.median(window), "one": statistics.median(one),
            "overlap": statistics.median(overlap), "busy": statistics.median(busy),
            "ops": sorted({r["op"] for r in records})}


def _measured(out: Path, trace_dir: Path) -> tuple[float, dict]:
    """Median step time of a run, and its trace statistics plus the step times themselves."""
    times = step_times(out)
    return statistics.median(times), {**trace_stats(trace_dir), "steps": times}


def _grpc_run(tmp: Path, label: str, concurrent: bool, device_threads: int) -> tuple[float, dict]:
    """One gRPC run; ``device_threads``: ``runtime.device_threads`` of the device processes (0: torch's default)."""
    trace_dir = tmp / f"trace-{label}"
    tree = {**CONCURRENCY_TREE, "runtime": {"address": f"127.0.0.1:{free_port()}", "trace_dir": str(trace_dir),
                                            "tokens": [f"t{i}" for i in range(CONCURRENCY_DEVICES)],
                                            "device_threads": device_threads}}
    config_path = tmp / f"{label}.toml"
    config_path.write_text(_toml(tree))
    devices = _start_devices(config_path, CONCURRENCY_DEVICES, tmp / f"logs-{label}")
    try:
        serve(parse_config({**tree, "runtime": {**tree["runtime"], "kind": "grpc"}}), tmp / label, progress=False,
              concurrent=concurrent)
    finally:
        _wait_devices(devices, tmp / f"logs-{label}")
    return _measured(tmp / label, trace_dir)


def _ray_actor_threads() -> int:
    """torch's intra-op threads in an actor started like DeviceHost (num_cpus=0): Ray sets OMP_NUM_THREADS=1."""
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> int:
            import torch

            return torch.get_num_threads()

    probe = Probe.options(num_cpus=0).remote()
    threads = ray.get(probe.threads.remote())
    ray.kill(probe)
    return threads


def _ray_run(tmp: Path, hosts: int) -> tuple[float, dict]:
    from splitfed.deploy import run_on_ray

    label = f"ray-{hosts}"
    trace_dir = tmp / f"trace-{label}"
    tree = {**CONCURRENCY_TREE, "runtime": {"kind": "ray", "ray_hosts": hosts, "trace_dir": str(trace_dir)}}
    run_on_ray(parse_config(tree), tmp / label, progress=False)
    return _measured(tmp / label, trace_dir)


def concurrency(tmp: Path) -> tuple[list[list[object]], dict]:
    """The pairs back to back in this process; returns the table rows and the numbers the text quotes.

    gRPC twice: device processes with torch's default threads (one per core), as ``splitfed device``
    starts them by default, and with ``runtime.device_threads = 1`` (4 processes x default threads
    oversubscribe 2 cores)."""
    import ray

    started = time.perf_counter()
    default_threads = torch.get_num_threads()  # what a device process gets on this machine
    runs: dict[str, tuple[float, dict]] = {}
    for threads, suffix in ((0, ""), (1, "-1t")):
        for concurrent, mode in ((True, "concurrent"), (False, "serial")):
            key = f"grpc-{mode}{suffix}"
            runs[key] = _grpc_run(tmp, key, concurrent, threads)
            print(key, runs[key], flush=True)
    ray.init(include_dashboard=False, log_to_driver=False)  # one local Ray for both runs (run_on_ray reuses it)
    try:
        actor_threads = _ray_actor_threads()
        for hosts in (2, 1):
            runs[f"ray-{hosts}"] = _ray_run(tmp, hosts)
            print(f"ray-{hosts}", runs[f"ray-{hosts}"], flush=True)
    finally:
        ray.shutdown()
    rows_of = [  # key, runtime, torch threads per device process, requests, baseline key
        ("grpc-serial", "gRPC, 4 device processes", default_threads, "one at a time", "grpc-serial"),
        ("grpc-concurrent", "gRPC, 4 device processes", default_threads, "all at once", "grpc-serial"),
        ("grpc-serial-1t", "gRPC, 4 device processes", 1, "one at a time", "grpc-serial-1t"),
        ("grpc-concurrent-1t", "gRPC, 4 device processes", 1, "all at once", "grpc-serial-1t"),
        ("ray-1", "Ray, 1 host actor (4 devices)", actor_threads, "take turns", "ray-1"),
        ("ray-2", "Ray, 2 host actors (2 devices each)", actor_threads, "2 at a time", "ray-1"),
    ]
    rows = []
    for key, runtime, threads, requests, baseline in rows_of:
        step, trace = runs[key]
        spread = f"{step:.2f} ({min(trace['steps']):.2f}-{max(trace['steps']):.2f})"
        rows.append([runtime, threads, requests, spread, f"{runs[baseline][0] / step:.2f}x",
                     f"{trace['window']:.2f}", f"{trace['one']:.2f}", f"{trace['overlap']:.2f}",
                     f"{trace['busy']:.2f}", f"{step - trace['busy']:.2f}"])
    facts: dict = {key: {"step": step, **trace} for key, (step, trace) in runs.items()}
    facts.update(actor_threads=actor_threads, default_threads=default_threads, elapsed=time.perf_counter() - started)
    print(f"concurrency section: {facts['elapsed']:.0f} s", flush=True)
    return rows, facts


def concurrency_body(rows: list[list[object]], facts: dict) -> str:
    tree = CONCURRENCY_TREE
    train = tree["train"]
    measured = (train["rounds"] - 1) * train["local_steps"]
    return (
        f"sfl (parallel: the server trains one server-side LoRA on the 4 devices' batches concatenated), "
        f"SmolLM2-135M, LoRA r=8 on q/v, 4 devices at cut {tree['devices']['cuts'][0]} of 30 layers, batch "
        f"{train['batch_size']} x {train['seq_len']} tokens per device, {train['rounds']} rounds of "
        f"{train['local_steps']} local steps. Step = wall time of a step until the last device is done: median, and in "
        f"brackets the fastest and slowest, of the {measured} steps of rounds 2-{train['rounds']} (round 1 warms up). All rows come from one run of the "
        f"script (section took {facts['elapsed']:.0f} s), each pair back to back. gRPC: the server (this process, "
        f"torch on {facts['default_threads']} threads) and 4 device processes on loopback; `serve(..., "
        f"concurrent=False)` sends the requests one at a time; the device processes run torch on its default "
        f"{facts['default_threads']} threads (as `splitfed device` starts them) or, in the second pair, with "
        f"`runtime.device_threads = 1`. Ray: local Ray, `runtime.ray_hosts` 2 vs 1 (devices of one host actor take turns). "
        f"Speed-up = step of the pair's first row / this row's. From the device traces (`runtime.trace_dir`), medians "
        f"over the same steps: fwd window = first device forward's start to last one's end; one fwd = mean duration "
        f"of a device forward; fwd overlap = sum of forward durations / time during which at least one runs "
        f"(1 = one at a time, 4 = all four together); device busy = time during which any device request (forward, "
        f"backward, optimizer step) runs; the rest of the step is the server's own work and the transport. A "
        f"measurement on this 2-core machine only, not a prediction for devices on machines of their own.\n\n"
        + markdown_table(["runtime", "torch threads / device process", "requests", "step (s): median (min-max)", "speed-up",
                          "fwd window (s)", "one fwd (s)", "fwd overlap", "device busy (s)", "rest of step (s)"], rows)
        + "\n\n" + concurrency_notes(facts)
    )


def _speed(before: float, after: float) -> str:
    """``after`` relative to ``before``, in words."""
    return f"{before / after:.2f}x faster" if after <= before else f"{after / before:.2f}x slower"


def concurrency_notes(facts: dict) -> str:
    """What limits the speed-up on this machine, with the numbers of this run."""
    con, ser = facts["grpc-concurrent"], facts["grpc-serial"]
    con1, ser1 = facts["grpc-concurrent-1t"], facts["grpc-serial-1t"]
    r1, r2 = facts["ray-1"], facts["ray-2"]
    threads = facts["default_threads"]
    rest = {key: row["step"] - row["busy"] for key, row in facts.items() if isinstance(row, dict)}
    return (
        f"The 4 device processes and the server share 2 cores, so requests sent at once can only help by filling "
        f"cores that the one-at-a-time run leaves idle, and the server's own work (the other "
        f"{30 - CONCURRENCY_TREE['devices']['cuts'][0]} layers and the LM head on the concatenated batch, its optimizer "
        f"step) runs while the devices wait: with the requests' round trips it is the rest of the step, "
        f"{min(rest.values()):.2f}-{max(rest.values()):.2f} s in every row, which no row overlaps. With torch's "
        f"default {threads} threads per device process, all at once puts 4 x {threads} threads on 2 cores: the "
        f"forwards overlap {con['overlap']:.1f}x, but one forward takes {con['one']:.2f} s instead of "
        f"{ser['one']:.2f} s, the forward window goes from {ser['window']:.2f} s to {con['window']:.2f} s and the step "
        f"is {_speed(ser['step'], con['step'])}. With one torch thread per device process (`runtime.device_threads = 1`, which Ray "
        f"also sets for its host actors: {facts['actor_threads']} thread) the forwards overlap {con1['overlap']:.1f}x "
        f"at {con1['one']:.2f} s each vs {ser1['one']:.2f} s alone and the window goes from {ser1['window']:.2f} s to "
        f"{con1['window']:.2f} s, but the rest of the step goes from {rest['grpc-serial-1t']:.2f} s to "
        f"{rest['grpc-concurrent-1t']:.2f} s, so the step is {_speed(ser1['step'], con1['step'])}; with Ray "
        f"(rest {rest['ray-1']:.2f} s vs {rest['ray-2']:.2f} s) 2 host actors are {_speed(r1['step'], r2['step'])} "
        f"than 1. These are one run's numbers: repeated runs of this section on this machine moved the ratios by "
        f"0.1x-0.4x (see also the min-max of the steps), so only each pair's direction is firm."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray-devices", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--only", choices=["runtimes", "concurrency"], action="append",
                        help="run only these sections (repeatable): runtimes = 1-3, concurrency = 4; default: all")
    args = parser.parse_args()
    sections = args.only or ["runtimes", "concurrency"]
    if "runtimes" in sections:
        runtimes(args)
    if "concurrency" in sections:
        with tempfile.TemporaryDirectory() as scratch:
            rows, facts = concurrency(Path(scratch))
        write_section("transport-concurrency", "Concurrent requests to devices: gRPC and Ray (bench/transport.py)",
                      concurrency_body(rows, facts))


def runtimes(args: argparse.Namespace) -> None:
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
        "down). The server and the 4 device processes (`runtime.device_threads = 1`) share this machine's 2 "
        "cores. As deployed, the server sends each request to every device before it waits, so device work "
        "(the next devices' forwards, a served device's backward) runs while the server computes, on the "
        "same 2 cores; with requests one at a time nothing overlaps (the engine before routes and futures "
        "always worked that way: 1.033x, measured 2026-11-24). Between runs on this machine these ratios move by about "
        "0.1-0.3. Goal: gRPC <= 1.10x in-process.\n\n"
        + markdown_table(["runtime", "requests", "step time (s)", "ratio"], step_rows)
        + "\n\n**gRPC transfer throughput** on loopback (encode + 1 MiB frames + reassemble + decode), median of 5.\n\n"
        + markdown_table(["direction", "message (MB)", "MB/s"], throughput_rows)
        + "\n\n**Ray**: memsfl on SmolLM2, batch 1 x 32 tokens, one local step per round; devices in 2 host actors "
        "(local Ray) vs in-process; training time of the second round.\n\n"
        + markdown_table(["devices", "in-process (s)", "Ray (s)", "ratio"], ray_rows)
    )
    write_section("transport", "Runtimes: gRPC and Ray vs in-process (bench/transport.py)", body)


if __name__ == "__main__":
    main()

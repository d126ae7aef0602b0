"""Shared by the bench scripts: run a config as real gRPC processes on this machine (a server or cloud,
edge servers, devices) and measure each process's peak RSS.

Every process runs ``splitfed`` under ``bench/_peak_rss.py``, which writes its own peak resident set
size (``getrusage``) to a file when it exits. The server runs in a child process too, so its peak is its
own, not this script's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

PEAK_RSS = Path(__file__).resolve().parent / "_peak_rss.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def toml_text(tree: dict) -> str:
    """A config tree (sections of scalars and lists, top-level scalars) as TOML: JSON's strings, numbers
    and lists are TOML's too."""
    top = [f"{key} = {json.dumps(value)}" for key, value in tree.items() if not isinstance(value, dict | None)]
    sections = [f"[{name}]\n" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in section.items()
                                           if value is not None)
                for name, section in tree.items() if isinstance(section, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def import_baseline_rss() -> int:
    """Peak RSS (bytes) of a process that only imports what every role imports (torch, transformers, PEFT,
    gRPC, splitfed) and exits: the floor under every process's figure."""
    code = ("import resource, splitfed.cli, splitfed.deploy; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def _start(args: list[str], rss_file: Path, log_file: Path) -> subprocess.Popen:
    log = log_file.open("w")
    return subprocess.Popen([sys.executable, str(PEAK_RSS), str(rss_file), *args], stdout=log, stderr=subprocess.STDOUT)


def run_processes(tree: dict, out: Path, edges: int = 0, timeout_s: float = 3600) -> dict:
    """Run the config ``tree`` with a server, ``edges`` edge processes and one process per device; returns
    {"summary": the run's summary, "rss": {"server": bytes, "edge0": bytes, ..., "device0": bytes, ...}}.
    Reuses ``out`` when it already holds both."""
    result_file = out / "processes.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    devices = tree["devices"]["count"]
    runtime = tree.setdefault("runtime", {})
    runtime.update(kind="grpc", address=f"127.0.0.1:{free_port()}", tokens=[f"token-{u}" for u in range(devices)],
                   device_threads=1, request_timeout_s=600, connect_timeout_s=600)
    if edges:
        runtime.update(edge_addresses=[f"127.0.0.1:{free_port()}" for _ in range(edges)],
                       edge_tokens=[f"edge-token-{e}" for e in range(edges)])
    config_path = out / "config.toml"
    config_path.write_text(toml_text(tree))
    tomllib.loads(config_path.read_text())  # what the processes will read
    run_dir = out / "run"
    roles = {"server": ["serve", str(config_path), "--out", str(run_dir), "--quiet", "--overwrite"]}
    roles |= {f"edge{e}": ["edge", str(config_path), "--id", str(e)] for e in range(edges)}
    roles |= {f"device{u}": ["device", str(config_path), "--id", str(u)] for u in range(devices)}
    processes = {name: _start(args, out / f"{name}.rss", out / f"{name}.log") for name, args in roles.items()}
    try:
        for name, process in processes.items():
            if process.wait(timeout=timeout_s) != 0:
                raise RuntimeError(f"{name} failed: see {out / (name + '.log')}")
    finally:
        for process in processes.values():
            process.kill()
    result = {"summary": json.loads((run_dir / "summary.json").read_text()),
              "rss": {name: int((out / f"{name}.rss").read_text()) for name in roles}}
    result_file.write_text(json.dumps(result, indent=1))
    return result

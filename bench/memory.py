"""Memory of memsfl vs SplitFed-V1, and process memory vs number of simulated devices.

1. Server peak memory (base weights held + adapters + optimizer state + saved
   activations, measured from the tensors the server role really holds) of memsfl (one
   base model, per-device LoRA) vs sflv1 (one server-side model copy per device), for
   2, 5 and 10 devices at cut 4. The memsfl paper claims 79% less than such baselines.
2. Peak RSS of a whole process simulating 1, 8 and 32 memsfl devices (one round, one
   local step each), each in a fresh subprocess. Target: 32 devices <= 1.3x one device.

    python bench/memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from _report import markdown_table, write_section

MB = 1024 * 1024
COMMON = {
    "data": {"partition": "iid", "max_train_chunks_per_device": 8, "eval_chunks": 8},
    "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
    "train": {"rounds": 1, "local_steps": 1, "batch_size": 4, "seq_len": 64},
}


def run_child(protocol: str, devices: int, compute: dict | None = None) -> dict:
    """Run one short experiment in a fresh process (placed by the ``compute`` section); return its summary,
    peak RSS and, on CUDA, the process's peak allocated GPU memory."""
    tree = {**COMMON, "protocol": protocol, "devices": {"count": devices, "cuts": [4]}, "compute": compute or {}}
    with tempfile.TemporaryDirectory() as out:
        code = (
            "import json, resource, sys\n"
            "from pathlib import Path\n"
            "from splitfed.config import parse_config\n"
            "from splitfed.run import run\n"
            f"summary = run(parse_config(json.loads({json.dumps(json.dumps(tree))})), Path({out!r}), progress=False)\n"
            "summary['rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "import torch\n"
            "from splitfed.roles.accounting import cuda_peak_bytes\n"
            "summary['cuda_peak_bytes'] = cuda_peak_bytes() if torch.cuda.is_available() else None\n"
            "print(json.dumps(summary))\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-devices", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--process-devices", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    server_rows = []
    for n in args.server_devices:
        mem = run_child("memsfl", n)["peak_mem_server_bytes"]
        v1 = run_child("sflv1", n)["peak_mem_server_bytes"]
        server_rows.append([n, f"{mem / MB:.0f}", f"{v1 / MB:.0f}", f"{100 * (1 - mem / v1):.1f}%"])
        print(server_rows[-1], flush=True)

    process_rows, baseline = [], None
    for n in args.process_devices:
        rss = run_child("memsfl", n)["rss_bytes"]
        baseline = baseline or rss
        process_rows.append([n, f"{rss / MB:.0f}", f"{rss / baseline:.2f}"])
        print(process_rows[-1], flush=True)

    body = (
        "SmolLM2-135M, LoRA r=8 on q/v, every device at cut 4, batch 4 x 64 tokens, one local step.\n\n"
        "**Server peak memory** (weights + adapters + optimizer state + saved activations held by the "
        "server role). Published claim for memsfl: 79% less than per-device server copies.\n\n"
        + markdown_table(["devices", "memsfl (MB)", "sflv1 (MB)", "memsfl saves"], server_rows)
        + "\n\n**Process peak RSS** simulating N memsfl devices in one process (fresh process each). "
        "Target: 32 devices <= 1.3x one device.\n\n"
        + markdown_table(["devices", "peak RSS (MB)", "ratio vs 1 device"], process_rows)
    )
    write_section("memory", "Memory: memsfl vs SplitFed-V1, and devices per process (bench/memory.py)", body)


if __name__ == "__main__":
    main()

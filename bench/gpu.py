"""splitfed on one CUDA GPU: split overhead, memsfl vs sflv1 memory, quickstart throughput in fp32 and bf16.

The same engine as on CPU, placed by the config's ``compute`` section (no separate GPU code):

1. Overhead: sfl with 1 device vs plain PEFT LoRA on the same batches (bench/overhead.py's
   measurement, every role and the PEFT model on ``cuda``), fp32 and bf16 bases.
2. Memory: the server's peak of memsfl (one base, per-device LoRA) vs sflv1 (a base copy per
   device) at 2, 5 and 10 devices, from the allocator (the roles' CUDA meters), and the process's
   peak allocated GPU memory (bench/memory.py's child runs, placed on ``cuda``).
3. Throughput: examples/quickstart.toml with every tier on ``cuda``, tokens trained per second of
   wall time, fp32 vs bf16.

Without a CUDA device it prints one line, ``bench/gpu.py: skipped: no CUDA device``, and exits 0.
About 5 minutes on one modern GPU.

    python bench/gpu.py [--steps 10]
"""

from __future__ import annotations

import argparse
import sys

import torch

SKIPPED = "bench/gpu.py: skipped: no CUDA device"
MB = 1024 * 1024
DTYPES = ("float32", "bfloat16")


def on_cuda(dtype: str) -> dict:
    """A ``compute`` section placing every tier on the first GPU with a ``dtype`` base."""
    return {"device": "cuda", "server": "cuda", "edge": "cuda", "dtype": dtype}


def overhead_rows(steps: int) -> list[list[object]]:
    from overhead import measure_overhead

    rows = []
    for dtype in DTYPES:
        split, peft, tokens = measure_overhead(steps, 4, on_cuda(dtype))
        rows.append([dtype, f"{peft * 1e3:.1f}", f"{split * 1e3:.1f}", f"{tokens / peft:.0f}", f"{tokens / split:.0f}",
                     f"{split / peft:.3f}"])
    return rows


def memory_rows() -> list[list[object]]:
    from memory import run_child

    rows = []
    for devices in (2, 5, 10):
        mem, v1 = run_child("memsfl", devices, on_cuda("float32")), run_child("sflv1", devices, on_cuda("float32"))
        rows.append([devices, f"{mem['peak_mem_server_bytes'] / MB:.0f}", f"{v1['peak_mem_server_bytes'] / MB:.0f}",
                     f"{100 * (1 - mem['peak_mem_server_bytes'] / v1['peak_mem_server_bytes']):.1f}%",
                     f"{mem['cuda_peak_bytes'] / MB:.0f}", f"{v1['cuda_peak_bytes'] / MB:.0f}"])
        print(rows[-1], flush=True)
    return rows


def throughput_rows() -> list[list[object]]:
    import tempfile
    from pathlib import Path

    from splitfed.config import load_config
    from splitfed.run import run

    example = Path(__file__).resolve().parent.parent / "examples" / "quickstart.toml"
    rows = []
    for dtype in DTYPES:
        sets = [f'compute.{tier}="cuda"' for tier in ("device", "server")] + [f'compute.dtype="{dtype}"']
        config = load_config(example, sets)
        train = config.train
        with tempfile.TemporaryDirectory() as out:
            summary = run(config, Path(out), progress=False)
        tokens = train.rounds * train.local_steps * config.devices.count * train.batch_size * train.seq_len
        rows.append([dtype, f"{summary['wall_s']:.1f}", f"{tokens / summary['wall_s']:.0f}",
                     f"{summary['final_eval_ppl']:.2f}", f"{summary['peak_mem_server_bytes'] / MB:.0f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed overhead steps per method and dtype")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(SKIPPED)
        return
    from _report import markdown_table, write_section

    gpu = torch.cuda.get_device_name(0)
    overhead = overhead_rows(args.steps)
    memory = memory_rows()
    throughput = throughput_rows()
    body = (
        f"GPU: {gpu}. SmolLM2-135M; every role on `cuda`; LoRA and optimizer state fp32 on either base.\n\n"
        f"**Split overhead** (sfl, 1 device, cut 4, vs plain PEFT on the same batches; LoRA r=8 on q/v, batch "
        f"8 x 128; median of {args.steps} alternating steps after one warm-up each):\n\n"
        + markdown_table(["base", "PEFT step (ms)", "sfl step (ms)", "PEFT tokens/s", "sfl tokens/s", "ratio"],
                         overhead)
        + "\n\n**Server memory**, fp32 base, cut 4, batch 4 x 64, one local step: the server role's meter "
        "(allocator peak during its passes + what it holds) and the whole process's peak allocated GPU memory "
        "(every role of the run shares the one GPU in-process):\n\n"
        + markdown_table(["devices", "memsfl server (MB)", "sflv1 server (MB)", "memsfl saves",
                          "memsfl process (MB)", "sflv1 process (MB)"], memory)
        + "\n\n**Quickstart throughput** (examples/quickstart.toml: memsfl, 8 devices, 3 rounds x 5 steps, batch "
        "4 x 64), wall time including evaluation and export:\n\n"
        + markdown_table(["base", "wall (s)", "tokens/s", "final ppl", "server peak (MB)"], throughput)
    )
    write_section("gpu", "One GPU: overhead, memory, throughput in fp32 and bf16 (bench/gpu.py)", body)


if __name__ == "__main__":
    sys.exit(main())

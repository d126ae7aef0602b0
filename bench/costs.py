"""The cost model against this machine: step time and peak memory of SmolLM2-135M at several cuts.

For each cut k, one ``sfl`` device holds embeddings + k layers and the server the other 30 - k
layers + head (LoRA r=8 on q/v, batch 4 x 64). Times are CPU seconds of this process with one
torch thread (``--threads``), so other processes on a shared machine do not distort them. The
real Device and Server roles run a few
split steps in this process (after a warm-up step) and we time, per step, the device forward,
the server forward + backward, and the device backward + optimizer step, then read the roles'
peak-memory meters (tensors they hold and autograd saves; not process RSS).

Predicted time = the cost model's FLOPs (system/costs.py) / this machine's matmul throughput,
measured first with a fp32 matmul of the model's MLP shape. The measured/predicted ratio mixes
two things: the time of what the model does not count (attention softmax, norms, elementwise
ops, Python) pushes it up, and matmuls that run faster than the calibration shape (the LM head's
576 x 49152) push it down. What matters for the planners is that the ratio is about the same at
every cut, i.e. time is proportional to the predicted FLOPs; a profile's FLOP/s then stands for
this machine's sustained training throughput = matmul throughput / ratio. Predicted memory is
``stage_memory`` (device) and ``predicted_memory`` (server).

    python bench/costs.py [--cuts 1 4 8 16 24 29] [--steps 3] [--threads 1]     # ~4 min
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _report import markdown_table, write_section
from splitfed.config import parse_config
from splitfed.run import build_protocol, plan_run
from splitfed.models.loading import load_model_config
from splitfed.system.clock import predicted_memory
from splitfed.system.costs import layer_costs, stage_flops, stage_memory

MB = 1024**2
BATCH, SEQ = 4, 64


def matmul_flops_per_s(tokens: int, hidden: int, intermediate: int, repeats: int = 30) -> float:
    """Sustained fp32 matmul FLOP/s of this machine on the model's MLP shape (tokens x hidden x intermediate)."""
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, intermediate)
    for _ in range(3):
        a @ b
    started = time.process_time()
    for _ in range(repeats):
        a @ b
    return 2.0 * tokens * hidden * intermediate * repeats / (time.process_time() - started)


def measure(cut: int, steps: int) -> dict:
    """Fastest of ``steps`` steps (the least disturbed by other processes) for device forward / server /
    device backward, and peak bytes."""
    config = parse_config({
        "protocol": "sfl", "seed": 0,
        "data": {"documents": ["hamlet"], "max_train_chunks_per_device": 16, "eval_chunks": 1},
        "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": 1, "local_steps": steps + 1, "batch_size": BATCH, "seq_len": SEQ},
        "devices": {"count": 1, "cuts": [cut]},
    })
    protocol, _ = build_protocol(plan_run(config), log=lambda record: None)
    device, server = protocol.devices[0], protocol.server
    times: dict[str, list[float]] = {"forward": [], "server": [], "backward": []}
    for step in range(steps + 1):
        t0 = time.process_time()
        activations = device.forward(0, step)
        t1 = time.process_time()
        gradients = server.process([(0, protocol.up(0, activations))])  # the link: encode + decode, as in runs
        t2 = time.process_time()
        gradient = protocol.down(0, gradients[0])
        t2b = time.process_time()
        norm = device.backward(gradient)
        scale = server.finish({0: norm}, config.train.lr)
        device.apply(scale[0], config.train.lr)
        t3 = time.process_time() - (t2b - t2)  # not the downlink's encode / decode
        if step:  # the first step warms up allocators and kernels
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(seconds)
    memory = predicted_memory(config, protocol.model.config, [cut])
    return {
        **{key: min(v) for key, v in times.items()},
        "device_peak": device.peak_bytes(), "server_peak": server.peak_bytes(),
        "server_predicted": memory["peak_mem_server_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=[1, 4, 8, 16, 24, 29])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (times are CPU seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_config = load_model_config("smollm2")
    costs = layer_costs(model_config, ["q_proj", "v_proj"])
    total = model_config.num_hidden_layers
    speed = matmul_flops_per_s(BATCH * SEQ, costs.hidden, costs.intermediate)
    print(f"matmul throughput: {speed / 1e9:.1f} GFLOP/s", flush=True)
    rows, ratios = [], []
    for cut in args.cuts:
        got = measure(cut, args.steps)
        device = stage_flops(costs, cut, BATCH, SEQ, 8, first=True, last=False)
        server = stage_flops(costs, total - cut, BATCH, SEQ, 8, first=False, last=True)
        predicted = {"forward": device.forward / speed, "server": server.total / speed,
                     "backward": device.backward / speed}
        step_predicted = sum(predicted.values())
        step_measured = sum(got[k] for k in predicted)
        ratios.append(step_measured / step_predicted)
        device_memory = stage_memory(costs, cut, 8, BATCH, SEQ, first=True, last=False).total
        rows.append([
            cut,
            *(f"{got[k]:.3f} / {predicted[k]:.3f}" for k in ("forward", "server", "backward")),
            f"{step_measured:.2f} / {step_predicted:.2f}", f"{ratios[-1]:.2f}",
            f"{got['device_peak'] / MB:.0f} / {device_memory / MB:.0f} "
            f"({100 * (device_memory / got['device_peak'] - 1):+.0f}%)",
            f"{got['server_peak'] / MB:.0f} / {got['server_predicted'] / MB:.0f} "
            f"({100 * (got['server_predicted'] / got['server_peak'] - 1):+.0f}%)",
        ])
        print(rows[-1], flush=True)
    spread = max(ratios) / min(ratios)
    body = (
        f"SmolLM2-135M, one `sfl` device + server in one process, LoRA r=8 on q/v, batch {BATCH} x {SEQ}, "
        f"{args.threads} torch thread(s), times in CPU seconds of the process (robust to other load), "
        f"fastest of {args.steps} steps after a warm-up step (other processes on a shared machine only slow "
        "steps down). Times in seconds as measured / predicted, where "
        f"predicted = FLOPs of the cost model / this machine's fp32 matmul throughput ({speed / 1e9:.1f} GFLOP/s, "
        "measured on the MLP's shape). measured / predicted mixes the time of what the FLOP count leaves out "
        "(softmax, norms, elementwise, Python: > 1) with matmuls faster than the calibration shape (the LM head: "
        "< 1); it is the same factor at every cut when time is proportional to the predicted FLOPs: here it spans "
        f"{min(ratios):.2f}-{max(ratios):.2f} (max / min = {spread:.2f}). This machine's sustained training "
        f"throughput, the number a profile's FLOP/s stands for, is about {speed / statistics.mean(ratios) / 1e9:.0f} "
        "GFLOP/s. Memory in MB as measured (the roles' meters: held tensors + saved activations) / predicted "
        "(difference).\n\n"
        + markdown_table(["cut", "device fwd (s)", "server fwd+bwd (s)", "device bwd+step (s)", "step (s)",
                          "measured / predicted", "device peak MB", "server peak MB"], rows)
    )
    write_section("costs", "Cost model vs this machine (bench/costs.py)", body)


if __name__ == "__main__":
    main()

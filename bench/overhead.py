"""Step-time overhead of splitting: sfl (1 device, in-process) vs plain PEFT LoRA training.

Both train SmolLM2-135M with LoRA (r=8, q/v) on the same Shakespeare batches (8 x 128
tokens) with the same optimizer. The split step includes everything the split adds:
encoding/decoding every message, the clipping exchange, two optimizers. Blocks of steps
alternate between the two so machine noise hits both alike; the ratio of medians is
reported. Target: <= 1.05.

    python bench/overhead.py [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from _report import markdown_table, write_section
from splitfed.config import parse_config
from splitfed.data.batches import BatchStream
from splitfed.models.loading import load_model
from splitfed.seeding import Purpose, derive_seed
from splitfed.run import build_protocol, plan_run


def measure_overhead(steps: int, cut: int, compute: dict | None = None) -> tuple[float, float, int]:
    """Median step seconds of sfl (1 device, in-process) and of plain PEFT on the same batches, over
    ``steps`` alternating steps after one warm-up each, placed by ``compute`` (the config section);
    and the tokens of a step."""
    config = parse_config({
        "protocol": "sfl",
        "data": {"partition": "iid", "max_train_chunks_per_device": 256},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 8, "seq_len": 128, "lr": 2e-4},
        "devices": {"count": 1, "cuts": [cut]},
        "compute": compute or {},
    })
    records: list[dict] = []
    protocol, data = build_protocol(plan_run(config), records.append)
    device = config.compute.torch_device("device")
    base = load_model("smollm2", config.compute.torch_dtype, device)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                           autocast_adapter_dtype=True)  # LoRA in fp32 on any base, as splitfed keeps it
    set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in protocol.aggregator.global_state.items()})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr)
    stream = BatchStream(data.train[0], config.train.batch_size, derive_seed(config.seed, Purpose.BATCHES, 0))

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def peft_step() -> float:
        synchronize()
        started = time.perf_counter()
        batch = stream.next_batch()
        loss = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     labels=batch.labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        synchronize()
        return time.perf_counter() - started

    def split_step(round_index: int) -> float:
        protocol.train_round(round_index, [0])  # its step record's wall time ends with the step's messages
        return records[-1]["wall_s"]

    split_step(0), peft_step()  # warm-up
    split_times, peft_times = [], []
    for i in range(steps):
        split_times.append(split_step(i + 1))
        peft_times.append(peft_step())
        print(f"step {i}: sfl {split_times[-1]:.3f} s, peft {peft_times[-1]:.3f} s", flush=True)
    return statistics.median(split_times), statistics.median(peft_times), config.train.batch_size * config.train.seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up each)")
    parser.add_argument("--cut", type=int, default=4)
    args = parser.parse_args()

    split_median, peft_median, tokens = measure_overhead(args.steps, args.cut)
    rows = [
        ["plain PEFT LoRA", f"{peft_median:.2f}", f"{tokens / peft_median:.0f}", "1.00"],
        [f"sfl, 1 device, cut {args.cut}, in-process", f"{split_median:.2f}", f"{tokens / split_median:.0f}",
         f"{split_median / peft_median:.3f}"],
    ]
    body = (
        f"SmolLM2-135M, LoRA r=8 on q/v, batch 8 x 128 tokens, AdamW, clipping 1.0; median of {args.steps} "
        "alternating steps after one warm-up each. Target ratio <= 1.05.\n\n"
        + markdown_table(["method", "step time (s)", "tokens/s", "ratio vs PEFT"], rows)
    )
    write_section("overhead", "Split overhead: sfl vs plain PEFT (bench/overhead.py)", body)


if __name__ == "__main__":
    main()

"""Server scheduling for memsfl: exact / Schrage / FIFO / random on heterogeneous instances.

Each instance is a memsfl round on SmolLM2-135M (LoRA r=8 on q/v, batch 8 x 128): n devices
of random classes (phone, laptop, jetson, edge_server) at random distances with random cuts
1..8, an edge server, 64 subchannels of 1 MHz shared equally, one Rayleigh draw. The system
model gives each device its head (forward + uplink), server time and tail (downlink +
backward); a step's time is the makespan of the server order. A round is the adapter
download + ``--local-steps`` steps + the adapter upload, so "round time" is what total
training time scales with. Published (memory-efficient SFL): 6% less training time.

    python bench/schedule.py [--instances 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from transformers import LlamaConfig

from _report import markdown_table, write_section
from splitfed.config import parse_config
from splitfed.models.families import num_layers
from splitfed.registry import protocol_class
from splitfed.system.schedule import Job, exact, fifo, makespan, random_order, schrage
from splitfed.system.clock import Clock
from splitfed.system.costs import adapter_bytes
from splitfed.system.profiles import DEVICE_CLASSES

# SmolLM2-135M's architecture (the numbers of its config.json), so the bench needs no download.
SMOLLM2 = LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
)


def instance(n: int, seed: int) -> tuple[list[Job], float]:
    """Jobs of one step and the adapter transfer seconds of one round."""
    rng = np.random.default_rng(seed)
    cuts = [int(c) for c in rng.integers(1, 9, n)]
    config = parse_config({
        "protocol": "memsfl",
        "seed": seed,
        "train": {"batch_size": 8, "seq_len": 128},
        "devices": {"count": n, "cuts": cuts},
        "system": {"device_classes": [str(c) for c in rng.choice(list(DEVICE_CLASSES), n)], "subchannels": 64},
    })
    topology = protocol_class(config.protocol).topology(config, cuts, num_layers(SMOLLM2))
    clock = Clock(config, SMOLLM2, topology)
    clock.begin_round(0, list(range(n)))
    jobs = [Job(t.head_s, t.server_s, t.tail_s) for t in map(clock.timing, range(n))]
    lora = [adapter_bytes(clock.costs, cut, 8) for cut in cuts]
    transfers = max(clock.down_s(u, lora[u]) for u in range(n)) + max(clock.up_s(u, lora[u]) for u in range(n))
    return jobs, transfers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--exact-max-n", type=int, default=10)
    args = parser.parse_args()

    rows = []
    for n in (5, 10, 20):
        methods = {"fifo": fifo, "random": random_order, "schrage": schrage}
        if n <= args.exact_max_n:
            methods["exact"] = exact
        spans: dict[str, list[float]] = {m: [] for m in methods}
        rounds: dict[str, list[float]] = {m: [] for m in methods}
        solve: dict[str, list[float]] = {m: [] for m in methods}
        for i in range(args.instances):
            jobs, transfers = instance(n, seed=1000 * n + i)
            for name, method in methods.items():
                started = time.perf_counter()
                order = method(jobs, np.random.default_rng(i))
                solve[name].append(time.perf_counter() - started)
                spans[name].append(makespan(jobs, order))
                rounds[name].append(transfers + args.local_steps * spans[name][-1])
        def saved(name: str, base: str) -> float:
            return statistics.mean(1 - a / b for a, b in zip(rounds[name], rounds[base]))

        for name in methods:
            rows.append([
                n, name, f"{statistics.mean(spans[name]):.3f}", f"{statistics.mean(rounds[name]):.2f}",
                f"{100 * saved(name, 'fifo'):.1f}%", f"{100 * saved(name, 'random'):.1f}%",
                f"{1000 * max(solve[name]):.1f}",
            ])
        if "exact" in methods:
            gap = statistics.mean(s / e - 1 for s, e in zip(spans["schrage"], spans["exact"]))
            print(f"n={n}: Schrage is {100 * gap:.2f}% above the optimum on average", flush=True)
    body = (
        f"{args.instances} random instances per n (memsfl on SmolLM2-135M, heterogeneous device classes, "
        f"distances, cuts 1..8 and Rayleigh fading; edge server; {args.local_steps} local steps per round). "
        "Step = server makespan; round = adapter download + steps + upload. Reductions are means over "
        "instances of 1 - round time / baseline round time. Published (memory-efficient SFL): 6%.\n\n"
        + markdown_table(
            ["n", "scheduler", "step makespan (s)", "round time (s)", "vs FIFO", "vs random", "max solve (ms)"], rows
        )
    )
    write_section("schedule", "Server scheduling: predicted rounds (bench/schedule.py)", body, predicted=True)


if __name__ == "__main__":
    main()

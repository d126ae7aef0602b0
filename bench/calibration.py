"""Validate the system model against this machine: checks that can fail (issue 14, item 4).

(a) Step time. ``splitfed profile`` measures this machine's FLOP/s on SmolLM2-135M first stages and on the
    LM head and loss alone; the
    clock, given that profile as every device and the server and a network too fast to matter, predicts
    a split step's seconds (``planning.predict``: the clock replaying the run); real runs measure the
    wall time of the same steps. In-process (one device, every role here, 2 threads) and as gRPC
    processes (a server and 2 device processes of 1 thread each, on this machine), for sfl, memsfl and
    sflv1 at cuts 2, 12 and 24. Goal: within 15%.
(b) Memory. The server role's meter (``peak_mem_server_bytes``: base weights of its stages, LoRA,
    optimizer state, activations saved for backward) against the peak RSS of the gRPC server process,
    for memsfl and sflv1 at 2, 5 and 10 devices (cut 4). The process also holds what no role's meter
    counts: the import floor (torch, transformers, gRPC) and the whole model it loads for evaluation.
(c) Planners in real runs: for each planner, its plan of a 4-device sfl run trained for 30 steps, against
    the uncompressed ``equal`` plan, over 3 seeds: held-out perplexity (mean and spread), next to the
    plan's predicted delay.

    python bench/calibration.py [--parts a b c] [--seeds 0 1 2]     # ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from _processes import import_baseline_rss, run_processes
from _report import markdown_table, write_section
from convergence import workload
from splitfed.config import parse_config
from splitfed.models.loading import load_model_config
from splitfed.planning.predict import predict
from splitfed.system.costs import layer_costs, weight_bytes
from splitfed.system.measure import profile_machine

MB = 1024 * 1024
CUTS = (2, 12, 24)
PROTOCOLS = ("sfl", "memsfl", "sflv1")
TIMED_STEPS = 4
"""Local steps of a timing run; the first is a warm-up, the median of the others is reported."""
FREE_NETWORK = {"fading": "none", "noise_dbm_per_hz": -300.0, "subchannel_hz": 1e8}
"""A channel fast enough that transfers take well under 1% of a step: the in-process and loopback runs have none."""
PLANNERS = ("equal", "cut_only", "bandwidth_only", "fedsllm", "sft")


def timing_tree(protocol: str, cut: int, devices: int, profile: Path) -> dict:
    return {
        "protocol": protocol, "seed": 0,
        "data": {"partition": "iid", "max_train_chunks_per_device": 16, "eval_chunks": 4},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": 1, "local_steps": TIMED_STEPS, "batch_size": 4, "seq_len": 64},
        "devices": {"count": devices, "cuts": [cut]},
        "system": {**FREE_NETWORK, "device_classes": [str(profile)], "server": str(profile)},
    }


def measure_profile(threads: int, path: Path, repeats: int = 5) -> dict:
    """This machine's profile with ``threads`` torch threads (a device process runs with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = parse_config(timing_tree("sfl", 2, 1, Path("unused.json")) | {"system": {}})
        profile = profile_machine(config, list(CUTS), repeats=repeats)
    finally:
        torch.set_num_threads(before)
    path.write_text(json.dumps(profile, indent=1))
    per_cut = ", ".join(f"{s['flop_per_s'] / 1e9:.1f}" for s in profile["stages"])
    print(f"profile, {threads} thread(s): {profile['flops'] / 1e9:.1f} GFLOP/s ({per_cut} at cuts {CUTS}; "
          f"head {profile['head_flops'] / 1e9:.1f})", flush=True)
    return profile


def measured_step_s(metrics: Path) -> float:
    """Median over the steps after the first of the step's wall time (its slowest device)."""
    steps: dict[int, float] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            steps[record["step"]] = max(steps.get(record["step"], 0.0), record["wall_s"])
    return statistics.median(seconds for step, seconds in steps.items() if step > 0)


def predicted_step_s(tree: dict) -> float:
    config = parse_config(tree)
    return predict(config, load_model_config(config.model.source)).round_s[0] / config.train.local_steps


def part_a(work: Path) -> str:
    from splitfed.run import run

    profiles = {threads: measure_profile(threads, work / f"profile-{threads}.json") for threads in (2, 1)}
    rows, misses, fresh_misses, speeds = [], [], [], []
    for runtime in ("in-process", "gRPC"):
        for protocol in PROTOCOLS:
            for cut in CUTS:
                # This machine's speed drifts over minutes (a shared host): a profile taken just before the run
                # separates the model's error from the drift since the session's profile.
                name = f"{'a' if runtime == 'in-process' else 'a-grpc'}-{protocol}-{cut}"
                threads = (2,) if runtime == "in-process" else (2, 1)
                fresh = {t: measure_profile(t, work / f"profile-{t}-{name}.json", repeats=3) for t in threads}
                speeds.append(fresh[2]["flops"] / profiles[2]["flops"])
                trees = {}
                for which, paths in (("session", {t: work / f"profile-{t}.json" for t in threads}),
                                     ("fresh", {t: work / f"profile-{t}-{name}.json" for t in threads})):
                    # in-process every role has 2 threads; as processes the devices have 1, the server 2
                    trees[which] = timing_tree(protocol, cut, 1 if runtime == "in-process" else 2, paths[min(threads)])
                    trees[which]["system"]["server"] = str(paths[2])
                predicted = {which: predicted_step_s(tree) for which, tree in trees.items()}
                tree = trees["fresh"]  # what the run is given (its sim_s uses the fresh profile)
                if runtime == "in-process":
                    run(parse_config(tree), work / name, progress=False, overwrite=True)
                    measured = measured_step_s(work / name / "metrics.jsonl")
                else:
                    shutil.rmtree(work / name, ignore_errors=True)  # timed afresh, like its profile
                    run_processes(json.loads(json.dumps(tree)), work / name)
                    measured = measured_step_s(work / name / "run" / "metrics.jsonl")
                error, fresh_error = predicted["session"] / measured - 1, predicted["fresh"] / measured - 1
                misses.append(abs(error))
                fresh_misses.append(abs(fresh_error))
                rows.append([runtime, protocol, cut, f"{predicted['session']:.3f}", f"{predicted['fresh']:.3f}",
                             f"{measured:.3f}", f"{100 * error:+.1f}%", f"{100 * fresh_error:+.1f}%",
                             "yes" if abs(fresh_error) <= 0.15 else "**no**"])
                print(rows[-1], flush=True)
    stages = "; ".join(
        f"{threads} thread(s): " + ", ".join(f"cut {s['cut']} {s['flop_per_s'] / 1e9:.0f}" for s in p["stages"])
        + f" (median {p['flops'] / 1e9:.0f}; LM head and loss alone {p['head_flops'] / 1e9:.0f})"
        for threads, p in profiles.items())
    within, fresh_within = sum(m <= 0.15 for m in misses), sum(m <= 0.15 for m in fresh_misses)
    return (
        "**(a) Step time: the clock with this machine's measured profile vs real wall time.** SmolLM2-135M, LoRA r=8 "
        f"on q/v, batch 4 x 64, {TIMED_STEPS} local steps (the first a warm-up; median of the rest; a step's time is "
        "its slowest device's). In-process: 1 device, every role in this process (2 torch threads). gRPC: a server "
        "(2 threads) and 2 device processes (1 thread each) on this machine, over loopback. The session's profile "
        f"(`splitfed profile` at the start, FLOP/s of first stages, GFLOP/s): {stages}; the clock prices a last "
        "stage's layers at the median and its LM head at the head's speed. Before each run the profile is taken "
        "again (3 repeats): this machine's speed drifts over minutes, and the second prediction shows the model's "
        f"error without that drift (the fresh 2-thread profiles ran at {min(speeds):.2f}-{max(speeds):.2f}x the "
        "session's). The clock's network is made too fast to matter (no fading, -300 dBm/Hz noise, 100 MHz "
        "subchannels): the prediction is compute only, and so misses what a step costs beyond FLOPs (encoding "
        f"messages, gRPC, Python). Goal: within 15%; {within} of {len(misses)} are with the session's profile, "
        f"{fresh_within} of {len(fresh_misses)} with the profile taken just before.\n\n"
        + markdown_table(["runtime", "protocol", "cut", "predicted step (s), session profile",
                          "predicted step (s), fresh profile", "measured step (s)", "error (session)",
                          "error (fresh)", "fresh within 15%"], rows)
    )


def part_b(work: Path) -> str:
    model_config = load_model_config("smollm2")
    costs = layer_costs(model_config, ["q_proj", "v_proj"])
    total, cut = model_config.num_hidden_layers, 4
    whole = weight_bytes(costs, total, True, True)
    server_part = weight_bytes(costs, total - cut, False, True)
    floor = import_baseline_rss()
    rows = []
    for protocol in ("memsfl", "sflv1"):
        for devices in (2, 5, 10):
            tree = {
                "protocol": protocol, "seed": 0,
                "data": {"partition": "iid", "max_train_chunks_per_device": 8, "eval_chunks": 4},
                "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
                "train": {"rounds": 1, "local_steps": 1, "batch_size": 4, "seq_len": 64},
                "devices": {"count": devices, "cuts": [cut]},
            }
            result = run_processes(tree, work / f"b-{protocol}-{devices}")
            meter, rss = result["summary"]["peak_mem_server_bytes"], result["rss"]["server"]
            # the whole model the server loads for evaluation: memsfl's slots use its server layers (metered),
            # sflv1's slots their own copies (metered), so none of it is
            outside = whole - server_part if protocol == "memsfl" else whole
            rest = rss - floor - outside
            rows.append([protocol, devices, f"{meter / MB:.0f}", f"{rss / MB:.0f}", f"{outside / MB:.0f}",
                         f"{rest / MB:.0f}", f"{rest / meter:.2f}"])
            print(rows[-1], flush=True)
    return (
        "**(b) Memory: the server role's meter vs the gRPC server process's peak RSS.** SmolLM2-135M, every device "
        "at cut 4, LoRA r=8 q/v, batch 4 x 64, one local step; a server process and one process per device. "
        f"The process also holds the import floor ({floor / MB:.0f} MB: a process that only imports torch, "
        "transformers, PEFT, gRPC and splitfed) and the whole fp32 model it loads for evaluation and export, which "
        "the meter does not count where no slot trains on it (memsfl's slots train on its server layers; sflv1's "
        "on copies of their own). 'RSS left' = RSS - floor - those weights: what the meter should explain.\n\n"
        + markdown_table(["protocol", "devices", "meter (MB)", "process peak RSS (MB)", "weights outside the meter (MB)",
                          "RSS left (MB)", "RSS left / meter"], rows)
    )


def planner_config(seed: int):
    """The planned workload (bench/convergence.py fits rounds(rank) on the same runs): sfl, 4 devices, cut 2."""
    return workload(8, seed)


def trains_like_equal(plan, equal) -> bool:
    """Same training numbers as the ``equal`` plan: sfl kept with one common cut, the same ranks, no lossy codec."""
    lossless = all(spec in ("none", "") for spec in [*plan.activations, *plan.gradients])
    return (plan.protocol == equal.protocol == "sfl" and len(set(plan.cuts)) == 1 and plan.ranks == equal.ranks
            and lossless)


def part_c(work: Path, seeds: list[int]) -> str:
    from splitfed.planning.calibrate import calibrate_codecs
    from splitfed.planning.registry import make_plan
    from splitfed.planning.sft import LADDER
    from splitfed.run import run

    model_config = load_model_config("smollm2")
    results: dict[str, list[dict]] = {name: [] for name in PLANNERS}
    # sft's codec errors, measured once on the model's real tensors (seed 0's batches) for every seed's plans
    calibration = calibrate_codecs(planner_config(seeds[0]), [spec for spec in LADDER if spec != "none"],
                                   progress=lambda line: print(line, flush=True))
    for seed in seeds:
        config = planner_config(seed)
        for name in PLANNERS:
            plan = make_plan(config, model_config, name, calibration=calibration)
            out = work / f"c-{name}-{seed}"
            summary_file = out / "summary.json"
            if name != "equal" and trains_like_equal(plan, results["equal"][-1]["plan"]):
                summary, ran = results["equal"][-1]["summary"], False
            else:
                summary = (json.loads(summary_file.read_text()) if summary_file.exists()
                           else run(plan.apply(config), out, progress=False, overwrite=True))
                ran = True
            results[name].append({"plan": plan, "summary": summary, "ran": ran})
            print(name, seed, f"{summary['final_eval_ppl']:.2f}", f"{plan.mean_round_s:.3f}", ran, flush=True)
    rows, steps = [], planner_config(0).train
    base = [r["summary"]["final_eval_ppl"] for r in results["equal"]]
    for name in PLANNERS:
        runs = results[name]
        ppl = [r["summary"]["final_eval_ppl"] for r in runs]
        change = [100 * (p / b - 1) for p, b in zip(ppl, base)]
        plans = [r["plan"] for r in runs]
        codecs = sorted({spec for p in plans for spec in p.activations})
        rows.append([
            name, ", ".join(sorted({p.protocol for p in plans})), " / ".join(codecs),
            f"{statistics.mean(p.mean_round_s for p in plans):.3f}",
            (f"{statistics.mean(r['summary']['sim_s'] for r in runs) / steps.rounds:.3f}" if all(r["ran"] for r in runs)
             else "not run: trains as `equal`"),
            f"{statistics.mean(ppl):.2f} ± {statistics.stdev(ppl):.2f}",
            f"{statistics.mean(change):+.2f}% ± {statistics.stdev(change):.2f}",
        ])
    return (
        f"**(c) Planners in real runs.** SmolLM2-135M on Shakespeare (one work per device), 4 devices, `sfl` "
        f"configured with cut 2, LoRA r=8 q/v, lr {steps.lr}, batch {steps.batch_size} x {steps.seq_len}, {steps.rounds} rounds x "
        f"{steps.local_steps} local steps = {steps.rounds * steps.local_steps} steps, 8 subchannels, the "
        f"declared device classes; seeds {', '.join(map(str, seeds))} (mean ± standard deviation over seeds). "
        "Predicted: the plan's mean round delay (the clock replaying it); run: the run's own `sim_s` per round "
        "(real message bytes). Perplexity change: against `equal` (no compression, the configured cut) at the "
        "same seed. A plan that keeps sfl, every rank and no lossy codec, changing only the common cut or the "
        "subchannels, trains exactly as `equal` (split == unsplit, tests/protocols/test_equivalence.py): it is not "
        "run again and shows `equal`'s perplexity.\n\n"
        + markdown_table(["planner", "protocol", "activation codecs", "predicted round (s)", "run round sim_s (s)",
                          "held-out ppl", "ppl vs equal"], rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="keep runs here (those of (b) and (c) are reused when present; (a) times afresh)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="calibration-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = {"a": lambda: part_a(work), "b": lambda: part_b(work), "c": lambda: part_c(work, args.seeds)}
    for name in args.parts:
        write_section(f"calibration-{name}", f"Calibration ({name}) (bench/calibration.py)", parts[name]())


if __name__ == "__main__":
    main()

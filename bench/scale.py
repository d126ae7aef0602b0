"""Scale: build time, time per round and peak RSS vs the number of simulated devices in one process.

memsfl (cuts 2, 4, 6 cycled over the devices) and sfl (cut 4) on SmolLM2-135M, LoRA r=8 on q/v,
10 devices per round, 2 rounds of 1 local step, batch 4 x 48 tokens, at most 16 training rows per
device; devices = 10, 100, 1000, 5000. Shakespeare ``by_role`` (one speaking role per device, 1046
roles at seq_len 48) where there are enough roles, ``iid`` beyond. Each configuration runs
``splitfed.run.run`` in a fresh subprocess, so its peak RSS is its own; the subprocess times the
engine's own functions (plan, model, data, building the roles, each round's training, evaluation,
checkpoint) by wrapping them, without changing what ``run`` does.

Targets (issue 16): round time at 5000 devices within 1.2x of 10 devices; build time linear in the
devices (fitted exponent of build = a * devices^b); peak RSS within 20% of base + devices x (adapter +
optimizer state + data).

    python bench/scale.py            # the full table (about 6 minutes on 2 otherwise idle cores)
    python bench/scale.py --quick    # devices 10 and 100 only, printed (smoke test: docs left alone)
    python bench/scale.py --profile memsfl 1000   # cProfile of one configuration: top cumulative entries
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import DOC, markdown_table, write_section

MB = 1024 * 1024
ROLES_AT_48 = 1046
"""Speaking roles of the shipped Shakespeare with a training row at seq_len 48 (``by_role``'s limit)."""
DEVICES = [10, 100, 1000, 5000]
PER_ROUND = 10
SEQ_LEN = 48
CUTS = {"memsfl": [2, 4, 6], "sfl": [4]}


def tree(protocol: str, devices: int) -> dict:
    return {
        "protocol": protocol,
        "devices": {"count": devices, "cuts": CUTS[protocol]},
        "data": {"partition": "by_role" if devices <= ROLES_AT_48 else "iid", "max_train_chunks_per_device": 16,
                 "eval_chunks": 4},
        "lora": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": 2, "local_steps": 1, "batch_size": 4, "seq_len": SEQ_LEN,
                  "devices_per_round": PER_ROUND, "keep_checkpoints": 1},
    }


# --- the child: one configuration, timed from inside ---------------------------------------------
def child(protocol: str, devices: int, out: Path, profile: bool) -> dict:
    """Run one configuration here with the engine's steps timed; return the measurements."""
    import resource

    import torch

    import splitfed.run as engine
    from splitfed.config import parse_config
    from splitfed.protocols.base import Protocol

    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    marks: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            marks.setdefault(f"{name}_first_start", time.perf_counter())
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                times.setdefault(name, []).append(time.perf_counter() - start)
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
        return wrapper

    # run() and build_protocol() look these names up in splitfed.run at call time
    for name, attr in [("plan", "plan_run"), ("model_files", "prepare_model"), ("model", "load_model"),
                       ("tokenizer", "load_tokenizer"), ("data", "build_data"), ("build", "build_protocol"),
                       ("train", "_train_round_with_retries"), ("checkpoint", "save_checkpoint"),
                       ("export", "export_run"), ("summary", "_summary"), ("plots", "write_plots")]:
        setattr(engine, attr, timed(name, getattr(engine, attr)))
    Protocol.evaluate = timed("eval", Protocol.evaluate)

    config = parse_config(tree(protocol, devices))
    started = time.perf_counter()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        engine.run(config, out, progress=False)
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
    else:
        engine.run(config, out, progress=False)
    total = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rounds = [r for r in records if r["kind"] == "round"]
    trained = sorted({u for r in rounds for u in r["devices"]})
    summary = json.loads((out / "summary.json").read_text())
    return {
        "protocol": protocol, "devices": devices, "partition": config.data.partition, "total_s": total,
        "times": times, "cpu": cpu, "before_round0_s": marks["train_first_start"] - started, "rss_bytes": rss,
        "trained": trained, "cuts": summary["cuts"], "model_config": _model_shape(engine, config),
        "train_rows": [d["rows"] for d in summary["data"]["devices"]],
        "torch_threads": torch.get_num_threads(),
    }


def _model_shape(engine, config) -> dict:
    model_config = engine.load_model_config(config.model.source)
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return {"hidden": model_config.hidden_size, "q_out": heads * head_dim, "v_out": kv * head_dim,
            "layers": model_config.num_hidden_layers}


def run_child(protocol: str, devices: int, profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, __file__, "--child", protocol, str(devices), out] + (["--profile-child"] if profile else [])
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{protocol} x {devices} failed:\n{result.stderr[-4000:]}")
        if profile:
            print(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the model of memory: base + devices x (adapter + optimizer state + data) -----------------------
def adapter_bytes(shape: dict, layers: int, rank: int = 8) -> int:
    """fp32 LoRA factors of rank ``rank`` on q_proj and v_proj over ``layers`` decoder layers."""
    per_layer = rank * (shape["hidden"] + shape["q_out"]) + rank * (shape["hidden"] + shape["v_out"])
    return 4 * per_layer * layers


def state_terms(m: dict) -> dict[str, int]:
    """The formula's device terms of one run, from the real sizes: every device's adapter at its cut, its
    training rows (3 int64 tensors of rows x seq_len), and the AdamW state (2 x adapter) of the devices that
    trained; memsfl also keeps, for each device that trained, a server-side adapter on the layers above its cut
    with its AdamW state (3 x that adapter). ``lazy``: the same with adapters only for devices that trained (a
    device that never trained holds none: ``roles.worker.Slot``)."""
    shape = m["model_config"]
    cuts = m["cuts"]
    adapters = sum(adapter_bytes(shape, cuts[u]) for u in range(m["devices"]))
    trained_adapters = sum(adapter_bytes(shape, cuts[u]) for u in m["trained"])
    data = sum(3 * 8 * rows * SEQ_LEN for rows in m["train_rows"])
    server = (sum(3 * adapter_bytes(shape, shape["layers"] - cuts[u]) for u in m["trained"])
              if m["protocol"] == "memsfl" else 0)
    return {"adapters": adapters, "optimizer": 2 * trained_adapters, "data": data, "server_slots": server,
            "issue": adapters + 2 * trained_adapters + data + server, "lazy": 3 * trained_adapters + data + server}


def fit_exponent(devices: list[int], seconds: list[float]) -> float:
    import numpy as np

    return float(np.polyfit(np.log(devices), np.log(seconds), 1)[0])


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for color, (protocol, ms) in zip(("C0", "C3", "C2"), results.items()):
        n = [m["devices"] for m in ms]
        ax.plot(n, [m["round_s"] for m in ms], "s-", color=color, label=f"{protocol}: round (training)")
        ax.plot(n, [m["build_s"] for m in ms], "o--", color=color, label=f"{protocol}: build")
        ax.plot(n, [m["roles_s"] for m in ms], "^:", color=color, linewidth=1, label=f"{protocol}: roles part of build")
    ax.axvline(ROLES_AT_48, color="grey", linewidth=0.8)
    ax.text(ROLES_AT_48 * 1.08, 0.98, "by_role | iid", transform=ax.get_xaxis_transform(), va="top", fontsize=7,
            color="grey")
    n = sorted({m["devices"] for ms in results.values() for m in ms})
    anchor = min(m["roles_s"] for ms in results.values() for m in ms)
    ax.plot(n, [anchor * d / n[0] for d in n], "-", color="grey", linewidth=0.6, label="proportional to devices (reference)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("simulated devices (10 train per round)")
    ax.set_ylabel("seconds")
    ax.set_title("splitfed: one process, SmolLM2-135M, 2 rounds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="devices 10 and 100 only; print, leave docs alone (smoke test)")
    parser.add_argument("--devices", type=int, nargs="+", help="device counts (default 10 100 1000 5000)")
    parser.add_argument("--protocols", nargs="+", default=["memsfl", "sfl"], choices=sorted(CUTS))
    parser.add_argument("--profile", nargs=2, metavar=("PROTOCOL", "DEVICES"),
                        help="print a cProfile of one configuration and exit")
    parser.add_argument("--json", type=Path, help="also write the raw measurements to this file")
    parser.add_argument("--from-json", type=Path, help="report the measurements of an earlier --json (no runs)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        protocol, devices, out = args.child
        print(json.dumps(child(protocol, int(devices), Path(out), args.profile_child)))
        return
    if args.profile:
        m = run_child(args.profile[0], int(args.profile[1]), profile=True)
        print(json.dumps({k: m[k] for k in ("times", "total_s", "rss_bytes")}, indent=1))
        return

    if args.from_json:
        report(json.loads(args.from_json.read_text()), args)
        return
    counts = args.devices or ([10, 100] if args.quick else DEVICES)
    if counts[0] != 10:
        raise SystemExit("the first device count must be 10 (the base of the memory model and the round-time target)")
    results: dict[str, list[dict]] = {}
    for protocol in args.protocols:
        for n in counts:
            wall = time.perf_counter()
            m = run_child(protocol, n)
            t = m["times"]
            m["build_s"] = t["plan"][0] + t["build"][0]
            m["roles_s"] = t["build"][0] - sum(t[k][0] for k in ("model_files", "model", "tokenizer", "data"))
            m["round_s"] = sum(t["train"]) / len(t["train"])
            m["round_cpu_s"] = sum(m["cpu"]["train"]) / len(m["cpu"]["train"])
            m["terms"] = state_terms(m)
            results.setdefault(protocol, []).append(m)
            print(f"{protocol} x {n}: {time.perf_counter() - wall:.0f} s wall; build {m['build_s']:.1f} s, "
                  f"round {m['round_s']:.2f} s, RSS {m['rss_bytes'] / MB:.0f} MB; times "
                  + json.dumps({k: [round(x, 2) for x in v] for k, v in t.items()}), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results))
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    rows, fits, targets, terms = [], {}, [], []
    for protocol, ms in results.items():
        base = ms[0]
        base_rss = {kind: base["rss_bytes"] - base["terms"][kind] for kind in ("issue", "lazy")}
        n = [m["devices"] for m in ms]
        fits[protocol] = (fit_exponent(n, [m["build_s"] for m in ms]), fit_exponent(n, [m["roles_s"] for m in ms]))
        for m in ms:
            t = m["times"]
            error = {kind: m["rss_bytes"] / (base_rss[kind] + m["terms"][kind]) - 1 for kind in base_rss}
            per_device = ((m["rss_bytes"] - base["rss_bytes"]) / (m["devices"] - base["devices"])
                          if m["devices"] > base["devices"] else None)
            m["rss_error"] = error
            rows.append([
                protocol, m["devices"], m["partition"], f"{m['build_s']:.1f}",
                f"{t_of(m, 'plan'):.1f} / {t_of(m, 'model'):.1f} / {t_of(m, 'data'):.1f} / {m['roles_s']:.2f}",
                " / ".join(f"{x:.1f}" for x in t["train"]), f"{m['round_s']:.1f}", f"{m['round_cpu_s']:.1f}",
                f"{m['round_s'] / base['round_s']:.2f} ({m['round_cpu_s'] / base['round_cpu_s']:.2f})",
                f"{sum(t['eval'][1:]) / len(t['train']):.1f} / {sum(t['checkpoint']) / len(t['checkpoint']):.2f}",
                f"{t_of(m, 'summary'):.1f}",
                f"{m['rss_bytes'] / MB:.0f}", "—" if per_device is None else f"{per_device / 1024:.1f}",
                f"{100 * error['issue']:+.1f}% / {100 * error['lazy']:+.1f}%",
            ])
        last = ms[-1]
        shape = last["model_config"]
        per_cut = ", ".join(f"{adapter_bytes(shape, c) / 1024:.0f} KB at cut {c}" for c in CUTS[protocol])
        terms.append(f"{protocol}: device adapter {per_cut}"
                     + (f", server-side adapter {adapter_bytes(shape, shape['layers'] - 4) / 1024:.0f} KB above cut 4"
                        if protocol == "memsfl" else "")
                     + f"; training rows {last['terms']['data'] / last['devices'] / 1024:.1f} KB per device on average "
                     f"at {last['devices']} devices; {len(last['trained'])} devices trained")
        ratio, cpu_ratio = last["round_s"] / base["round_s"], last["round_cpu_s"] / base["round_cpu_s"]
        targets.append(
            f"- **{protocol}**: round time at {last['devices']} devices = {ratio:.2f}x that at 10 (CPU time "
            f"{cpu_ratio:.2f}x; target <= 1.2x: {'met' if ratio <= 1.2 else 'missed'}); build time ~ "
            f"devices^{fits[protocol][0]:.2f} (target: linear, i.e. at most 1; the roles part alone ~ "
            f"devices^{fits[protocol][1]:.2f}); peak RSS at {last['devices']} devices {100 * last['rss_error']['issue']:+.1f}% "
            f"vs the issue's formula (target within 20%: {'met' if abs(last['rss_error']['issue']) <= 0.2 else 'missed'}), "
            f"{100 * last['rss_error']['lazy']:+.1f}% vs the formula with adapters only for devices that trained")
    headers = ["protocol", "devices", "partition", "build (s)", "plan / model / data / roles (s)", "rounds 0 / 1 (s)",
               "round mean (s)", "round CPU (s)", "round vs 10 (CPU)", "eval / checkpoint per round (s)",
               "summary (s)", "peak RSS (MB)", "kept per device (KB)", "RSS vs formula: issue / trained only"]
    print(markdown_table(headers, rows))
    for protocol, (b, roles) in fits.items():
        print(f"{protocol}: build time ~ devices^{b:.3f} (roles part ~ devices^{roles:.3f})")

    if args.quick:
        print("--quick: docs/benchmarks.md and docs/scale.png left as they are")
        return
    png = DOC.parent / "scale.png"
    plot(results, png)
    body = (
        "SmolLM2-135M, LoRA r=8 on q_proj/v_proj, memsfl with cuts 2/4/6 cycled over the devices and sfl (parallel) "
        f"at cut 4; {PER_ROUND} devices per round, 2 rounds of 1 local step, batch 4 x {SEQ_LEN} tokens, at most 16 "
        f"training rows per device, 4 eval rows, one checkpoint kept. Shakespeare `by_role` (one speaking role per "
        f"device; {ROLES_AT_48} roles at seq_len {SEQ_LEN}) up to {ROLES_AT_48} devices, `iid` beyond. Each row is a "
        "fresh process running `splitfed.run.run`; every time and RSS is **measured** in it (times by wrapping the "
        "engine's own functions, wall clock and process CPU time; peak RSS by `getrusage`); only the formula is "
        "computed. The machine ran other work at the same time: compare ratios within one run.\n\n"
        "- **build**: `plan_run` + `build_protocol` (model files, model load, tokenizer, data = tokenise + partition, "
        "roles = the protocol object: topology, workers, slots with their batch streams, clock, global adapter); the "
        "base-model evaluation before round 0 is not included.\n"
        "- **round**: the engine's training call of each round (adapters down, the local step, adapters up, "
        "aggregation); round 0 also injects the pool's few PEFT adapters. The round's evaluation (4 rows) and "
        "checkpoint are shown apart: a checkpoint holds every device's state, so it grows with the devices by design. "
        "**summary**: the run's summary at the end (the memory report walks every worker).\n"
        "- **kept per device**: (peak RSS - peak RSS at 10 devices) / (devices - 10). The peak is set by the "
        "server's activations during a step, which vary between runs by tens of MB: only the 1000- and 5000-device "
        "rows hold enough devices to rise above that.\n"
        "- **RSS vs formula**: measured peak RSS / (base + device terms) - 1. Issue's formula: every device's adapter "
        "at its cut + its training rows (3 int64 tensors) + AdamW state (2 x adapter) of the devices that trained "
        "(+ memsfl: each trained device's server-side adapter and its AdamW state); *trained only*: adapters only for "
        "the devices that trained (a device that never trained holds no adapter). Base = the 10-device run's RSS "
        "minus its own terms (there all 10 devices train, so both formulas agree). "
        + "; ".join(terms) + ".\n\n"
        + markdown_table(headers, rows) + "\n\n" + "\n".join(targets) + "\n\n"
        "![build and round time vs devices](scale.png)\n"
    )
    write_section("scale", "Scale: devices per process (bench/scale.py)", body)


def t_of(m: dict, key: str) -> float:
    return sum(m["times"].get(key, [0.0]))


if __name__ == "__main__":
    main()

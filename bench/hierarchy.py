"""Three tiers against two: SplitLLM (user -> edge -> cloud) vs SplitFed-V1 and shared-server SplitFed.

SmolLM2-135M-Instruct (30 layers), LoRA r=8 on q/v, Shakespeare split by work over 8 users,
batch 4 x 64 tokens, the same rounds, local steps, lr and seeds for every method:

- ``splitllm``: 2 edge servers (users 0,2,4,6 on edge 0, users 1,3,5,7 on edge 1), user cut 4,
  ``cloud_cut`` 16: users hold the embeddings and layers [0, 4), each edge [4, 16), the cloud
  [16, 30) with the final norm, LM head and loss; one cloud-side LoRA (``cloud_lora = "shared"``).
  Each round every edge trains with one of its users, so 2 users train per round.
- ``sflv1``: two tiers, one server-side model copy [4, 30) per user (8 copies), devices_per_round 2.
- ``sfl``: two tiers, one shared server [4, 30) with one LoRA, devices_per_round 2 (parallel mode).

Why these cuts: user cut 4 is the cut of the other benchmarks here (bench/memory.py, bench/compression.py),
so device memory and the two-tier rows are the ones measured there; ``cloud_cut`` 16 is next to the protocol's
default (halfway between the deepest user cut and the last layer: 17) and gives the edges 12 of the 26
server-side layers and the cloud 14. The cloud also holds the LM head (49,152 x 576) and serves both edges'
batches at once, so its peak is the larger one; a second table sweeps ``cloud_cut`` (one short run each,
memory only) to show how the most loaded server-side worker moves with it.

Every method trains 2 users x local_steps x batch sequences per round, so perplexity is compared after the
same number of samples (the baselines draw their 2 users at random each round, seeded; splitllm takes each
edge's users in turn, so the users, and their works, differ). Memory comes from the roles' meters (weights,
adapters, optimizer state and the activations autograd saves, per worker, in-process), read from the first
seed; a column says whether the other seeds agree (a slot's AdamW state appears at its first step, so sflv1's
server grows a little with every user that has trained once). Bytes are the encoded messages of one user's step,
per hop.

    python bench/hierarchy.py [--seeds 0 1 2] [--rounds 8] [--local-steps 2] [--out /tmp/hierarchy]   # ~20 min on 2 cores
    python bench/hierarchy.py --processes   # the same methods as gRPC processes, peak RSS each (~10 min)

Run directories are reused when they already hold a summary.json (delete --out to measure again).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _processes import import_baseline_rss, run_processes
from _report import markdown_table, write_section
from splitfed.config import RunConfig, parse_config
from splitfed.run import run

USERS, EDGES, CUT, CLOUD_CUT, LAYERS = 8, 2, 4, 16, 30
PER_ROUND = EDGES
"""Users trained per round: splitllm pairs each edge with one user; the baselines get devices_per_round = 2."""
BATCH, SEQ, LR, RANK = 4, 64, 2e-3, 8
EVAL_CHUNKS = 32
METHODS = ("splitllm", "sflv1", "sfl")
MB = 2**20
PUBLISHED = 0.74
"""SplitLLM's abstract: "reduce peak memory usage up to 74% compared to the state-of-the-art benchmarks"."""


def config_tree(method: str, seed: int, rounds: int, local_steps: int, *, users: int = USERS,
                cloud_cut: int = CLOUD_CUT, eval_chunks: int = EVAL_CHUNKS) -> dict:
    """The config of one run, as the tree a TOML file holds."""
    tree: dict = {
        "protocol": method,
        "seed": seed,
        "data": {"partition": "by_document", "max_train_chunks_per_device": 32, "eval_chunks": eval_chunks},
        "lora": {"rank": RANK, "alpha": 2.0 * RANK, "targets": ["q_proj", "v_proj"]},
        "train": {"rounds": rounds, "local_steps": local_steps, "batch_size": BATCH, "seq_len": SEQ, "lr": LR,
                  "keep_checkpoints": 1},
        "devices": {"count": users, "cuts": [CUT]},
    }
    if method == "splitllm":
        tree["splitllm"] = {"edges": EDGES, "cloud_cut": cloud_cut, "order": "rotate", "cloud_lora": "shared"}
    else:
        tree["train"]["devices_per_round"] = min(PER_ROUND, users)
    if method == "sfl":
        tree["sfl"] = {"mode": "parallel"}
    return tree


def config(method: str, seed: int, rounds: int, local_steps: int, **options) -> RunConfig:
    return parse_config(config_tree(method, seed, rounds, local_steps, **options))


def measure(cfg: RunConfig, out: Path) -> dict:
    """One run (reused if ``out`` already holds its summary): its summary, the perplexity after each round,
    the mean bytes of one user's step per hop, and the bytes per round by message kind."""
    if not (out / "summary.json").is_file():
        run(cfg, out, progress=False, overwrite=True)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    rounds = [r for r in records if r["kind"] == "round"]
    hops: dict[str, float] = {}
    for record in steps:
        if "bytes_by_hop" in record:  # name hops by tier, not by user: user3->edge1 -> user->edge
            for hop, nbytes in record["bytes_by_hop"].items():
                key = "->".join(part.rstrip("0123456789") for part in hop.split("->"))
                hops[key] = hops.get(key, 0.0) + nbytes / len(steps)
        else:
            hops["device->server"] = hops.get("device->server", 0.0) + record["bytes_up"] / len(steps)
            hops["server->device"] = hops.get("server->device", 0.0) + record["bytes_down"] / len(steps)
    kinds: dict[str, float] = {}
    for record in rounds:
        for kind, nbytes in record["bytes_by_kind"].items():
            kinds[kind] = kinds.get(kind, 0.0) + nbytes / len(rounds)
    return {"summary": summary, "ppl": [summary["base_eval_ppl"]] + [r["eval_ppl"] for r in rounds],
            "hops": hops, "kinds": kinds, "bytes_per_round": (summary["bytes_up"] + summary["bytes_down"]) / len(rounds),
            "tokens": summary["tokens"], "users": [r["devices"] for r in rounds]}


def spread(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def server_workers(method: str, summary: dict, users: int = USERS) -> str:
    """What the method's server side holds, in words."""
    if method == "splitllm":
        edge, cloud = summary["peak_mem_edge_bytes"], summary["peak_mem_cloud_bytes"]
        return (f"{EDGES} edges, layers [{CUT}, {CLOUD_CUT}): {edge / MB:.0f} each; "
                f"cloud, [{CLOUD_CUT}, {LAYERS}) + head: {cloud / MB:.0f}")
    if method == "sflv1":
        return f"1 server, {users} copies of [{CUT}, {LAYERS}) + head"
    return f"1 server, [{CUT}, {LAYERS}) + head"


def reduction(ours: float, theirs: float) -> str:
    return f"{100 * (1 - ours / theirs):.1f}%"


def in_process_table(results: dict[str, list[dict]], sflv1_two: dict, sweep: list[tuple[int, dict]],
                     seeds: list[int]) -> str:
    """The in-process measurements (every role in this process, memory from the roles' meters) as markdown.
    ``--processes`` writes the same methods as separate processes in a section of its own."""
    first = {m: runs[0]["summary"] for m, runs in results.items()}
    memory_rows = []
    for method, summary in first.items():
        peaks = [r["summary"]["peak_mem_server_bytes"] for r in results[method]]
        devices = {r["summary"]["peak_mem_device_bytes"] for r in results[method]}
        same = "yes" if len(set(peaks)) == 1 and len(devices) == 1 else \
            f"server {min(peaks) / MB:.0f}-{max(peaks) / MB:.0f}" + ("" if len(devices) == 1 else ", device differs")
        memory_rows.append([f"`{method}`", server_workers(method, summary), f"{summary['peak_mem_server_bytes'] / MB:.0f}",
                            f"{summary['peak_mem_server_total_bytes'] / MB:.0f}", f"{summary['peak_mem_device_bytes'] / MB:.0f}", same])
    s2 = sflv1_two["summary"]
    memory_rows.append(["`sflv1`, 2 users (memory-only run, 1 step)", server_workers("sflv1", s2, 2),
                        f"{s2['peak_mem_server_bytes'] / MB:.0f}", f"{s2['peak_mem_server_total_bytes'] / MB:.0f}",
                        f"{s2['peak_mem_device_bytes'] / MB:.0f}", "-"])

    ours = first["splitllm"]
    reduction_rows = []
    for label, theirs in (("`sflv1` (8 copies)", first["sflv1"]), ("`sflv1`, 2 users (2 copies)", s2),
                          ("`sfl` (one shared server)", first["sfl"])):
        reduction_rows.append([label, reduction(ours["peak_mem_server_bytes"], theirs["peak_mem_server_bytes"]),
                               reduction(ours["peak_mem_server_total_bytes"], theirs["peak_mem_server_total_bytes"]),
                               reduction(ours["peak_mem_device_bytes"], theirs["peak_mem_device_bytes"])])

    base = {m: [r["ppl"][0] for r in runs] for m, runs in results.items()}
    quality_rows = []
    for method, runs in results.items():
        finals = [r["ppl"][-1] for r in runs]
        paired = [r["ppl"][-1] - s["ppl"][-1] for r, s in zip(runs, results["sfl"])]
        tokens = sorted({r["tokens"] for r in runs})
        quality_rows.append([f"`{method}`", spread(finals), f"{min(finals):.2f}-{max(finals):.2f}",
                             "-" if method == "sfl" else spread(paired),
                             ", ".join(f"{x:.2f}" for x in finals), "/".join(f"{t:,}" for t in tokens)])

    hop_rows = []
    for method, runs in results.items():
        hops, kinds = runs[0]["hops"], runs[0]["kinds"]
        access = [v for k, v in hops.items() if k in ("user->edge", "edge->user", "device->server", "server->device")]
        backhaul = [hops.get("edge->cloud", 0.0), hops.get("cloud->edge", 0.0)]
        adapters = kinds.get("adapter_download", 0.0) + kinds.get("adapter_upload", 0.0)
        hop_rows.append([f"`{method}`", " / ".join(f"{v / 1024:.0f}" for v in access),
                         " / ".join(f"{v / 1024:.0f}" for v in backhaul) if any(backhaul) else "-",
                         f"{adapters / MB:.2f}", f"{runs[0]['bytes_per_round'] / MB:.2f}"])

    sweep_rows = []
    for cut, summary in sweep:
        sweep_rows.append([cut, f"{cut - CUT} / {LAYERS - cut}", f"{summary['peak_mem_edge_bytes'] / MB:.0f}",
                           f"{summary['peak_mem_cloud_bytes'] / MB:.0f}", f"{summary['peak_mem_server_bytes'] / MB:.0f}",
                           f"{summary['peak_mem_server_total_bytes'] / MB:.0f}",
                           reduction(summary["peak_mem_server_bytes"], first["sfl"]["peak_mem_server_bytes"]),
                           reduction(summary["peak_mem_server_bytes"], first["sflv1"]["peak_mem_server_bytes"])])

    curves = {m: [round(statistics.fmean(c), 2) for c in zip(*(r["ppl"] for r in runs))] for m, runs in results.items()}
    return (
        "**Peak memory (MB)**, in-process, from the roles' meters (weights held + LoRA + optimizer state + "
        "activations saved for backward, per worker). Most loaded server-side worker = `peak_mem_server_bytes` "
        "(splitllm: the larger of an edge and the cloud); server side in all = `peak_mem_server_total_bytes` "
        "(splitllm: both edges + the cloud, each its own machine; two-tier: the one server). MB = 2^20 bytes. A slot's "
        "AdamW state appears at its first step, so sflv1's server, with 8 copies and 2 users per round, holds more "
        "the more of its users have trained (about 3 MB per copy); the memory-only rows (1 round of 1 step) have "
        "trained every slot they hold.\n\n"
        + markdown_table(["method", "server-side workers (MB)", "most loaded server-side worker", "server side in all",
                          "device", f"same in seeds {seeds}"], memory_rows)
        + "\n\n**splitllm's reduction** of each figure against each baseline (1 - splitllm / baseline):\n\n"
        + markdown_table(["against", "most loaded server-side worker", "server side in all", "device"], reduction_rows)
        + "\n\n**Held-out perplexity** after the same number of samples (base model: "
        + ", ".join(f"{b:.2f}" for b in base["sfl"]) + " per seed; every method of a seed has the same eval set):\n\n"
        + markdown_table(["method", "final perplexity (mean ± sd over seeds)", "range", "minus sfl's, same seed (mean ± sd)",
                          "per seed", "tokens trained (each seed)"], quality_rows)
        + "\n\nMean perplexity after each round (round 0 = base): " + json.dumps(curves)
        + "\n\n**Bytes on the wire** (encoded messages, seed " + str(seeds[0]) + "). Per user step, up / down: activations "
        "with labels and mask up, activation gradients down, clipping norm and scale. The access link is the user's "
        "(wireless) hop to its edge or server; the backhaul is the wired edge -> cloud hop, which carries the same "
        "activations and gradients again. Per round: adapters (LoRA downloaded at round start and uploaded at round "
        "end, between the aggregator and every other worker of the round: for splitllm the 2 users' and the 2 edges' "
        "LoRA to and from the cloud; for sfl and sflv1 only the 2 devices', the server being the aggregator) and "
        "everything together:\n\n"
        + markdown_table(["method", "access link per user step (KiB up / down)", "backhaul per user step (KiB up / down)",
                          "adapters per round (MB)", "all hops per round (MB, up + down)"], hop_rows)
        + f"\n\n**splitllm's `cloud_cut`** (one round of one step each, memory only; edges hold [{CUT}, cloud_cut), the "
        f"cloud [cloud_cut, {LAYERS}) + head). Reductions of the most loaded server-side worker against the runs above:\n\n"
        + markdown_table(["cloud_cut", "layers edge / cloud", "edge", "cloud", "most loaded", "server side in all",
                          "vs sfl", "vs sflv1 (8 copies)"], sweep_rows)
    )


PROCESS_ROUNDS = 4
"""Rounds of the process runs (1 local step each): with ``order = "rotate"`` every splitllm user trains once."""


def process_table(runs: dict[str, dict], floor: int) -> str:
    """The same methods as separate gRPC processes on this machine: each process's peak RSS beside the
    roles' meter for its worker, and the server side's totals."""
    rows, totals = [], {}
    for method, result in runs.items():
        summary, rss = result["summary"], result["rss"]
        devices = [v for k, v in rss.items() if k.startswith("device")]
        if method == "splitllm":
            servers = [("cloud", f"[{CLOUD_CUT}, {LAYERS}) + head (loads all {LAYERS} for eval)",
                        summary["peak_mem_cloud_bytes"], rss["server"])]
            servers += [(f"edge {e}", f"[{CUT}, {CLOUD_CUT})", summary["peak_mem_edge_bytes"], rss[f"edge{e}"])
                        for e in range(EDGES)]
        else:
            copies = f"{USERS} copies of " if method == "sflv1" else ""
            servers = [("server", f"{copies}[{CUT}, {LAYERS}) + head (loads all {LAYERS} for eval)",
                        summary["peak_mem_server_bytes"], rss["server"])]
        for name, layers, meter, peak in servers:
            rows.append([f"`{method}`", name, layers, f"{meter / MB:.0f}", f"{peak / MB:.0f}", f"{(peak - floor) / MB:.0f}"])
        rows.append([f"`{method}`", f"{USERS} users (min-max)", f"[0, {CUT})", f"{summary['peak_mem_device_bytes'] / MB:.0f}",
                     f"{min(devices) / MB:.0f}-{max(devices) / MB:.0f}",
                     f"{(min(devices) - floor) / MB:.0f}-{(max(devices) - floor) / MB:.0f}"])
        peaks = [peak for *_, peak in servers]
        totals[method] = (max(peaks), sum(peaks))
    ours = totals["splitllm"]
    total_rows = [[f"`{m}`", f"{most / MB:.0f}", f"{whole / MB:.0f}",
                   "-" if m == "splitllm" else reduction(ours[0], most), "-" if m == "splitllm" else reduction(ours[1], whole)]
                  for m, (most, whole) in totals.items()]
    return (
        f"**As real processes** (gRPC on loopback: splitllm = cloud + {EDGES} edge processes + {USERS} user processes, "
        f"sflv1 and sfl = server + {USERS} device processes; {PROCESS_ROUNDS} rounds of 1 local step, same model, "
        "cuts, batch and users per round as above). Peak RSS is each process's own (`getrusage`, written when it "
        f"exits); the import floor, a process that only imports torch, transformers, PEFT, gRPC and splitfed, is "
        f"{floor / MB:.0f} MB and is in every figure. The meter column is the roles' meter for that worker in the "
        "same run (summary.json). The cloud and the two-tier server also load the whole model (all layers, for the "
        "held-out evaluation and the export), which the meters do not count: their RSS holds weights the meters "
        "leave out.\n\n"
        + markdown_table(["method", "process", "layers held by its worker", "meter (MB)", "peak RSS (MB)",
                          "RSS minus import floor (MB)"], rows)
        + "\n\nServer-side processes' peak RSS (MB) and splitllm's reduction (1 - splitllm / baseline):\n\n"
        + markdown_table(["method", "most loaded server-side process", "server-side processes in all",
                          "splitllm: most loaded", "splitllm: in all"], total_rows)
        + f"\n\nAgainst the published \"up to {PUBLISHED:.0%} lower peak memory\": as processes, the most loaded "
        f"server-side process of splitllm (the cloud) is {reduction(ours[0], totals['sflv1'][0])} below sflv1's server "
        f"({USERS} copies) and {reduction(ours[0], totals['sfl'][0])} below sfl's. These reductions are smaller than "
        "the meters' (above) because every process pays the import floor and the cloud, like the two-tier server, "
        "loads the whole model for evaluation and export (a gap of ours, not of the design: the cloud could hold "
        "only its layers and evaluate through the edges)."
    )


def measure_processes(seed: int, out: Path) -> None:
    floor = import_baseline_rss()
    runs = {}
    for method in METHODS:
        print(f"processes: {method}", flush=True)
        tree = config_tree(method, seed, PROCESS_ROUNDS, 1, eval_chunks=4)
        runs[method] = run_processes(tree, out / f"processes-{method}-seed{seed}", edges=EDGES if method == "splitllm" else 0)
    write_section("hierarchy-processes", "Three tiers as real processes: peak RSS per process (bench/hierarchy.py --processes)",
                  f"Seed {seed}.\n\n" + process_table(runs, floor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--cloud-cuts", type=int, nargs="+", default=[8, 12, 16, 20, 24],
                        help="cloud_cut values of the memory-only sweep")
    parser.add_argument("--processes", action="store_true",
                        help="instead: run the three methods as gRPC processes (peak RSS per process), own section")
    parser.add_argument("--out", type=Path, default=Path("/tmp/hierarchy"), help="run directories (reused when present)")
    args = parser.parse_args()

    if args.processes:
        measure_processes(args.seeds[0], args.out)
        return
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method in METHODS:
            print(f"seed {seed}: {method}", flush=True)
            cfg = config(method, seed, args.rounds, args.local_steps)
            results[method].append(measure(cfg, args.out / f"{method}-r{args.rounds}x{args.local_steps}-seed{seed}"))
            print(f"  final ppl {results[method][-1]['ppl'][-1]:.2f}, server peak "
                  f"{results[method][-1]['summary']['peak_mem_server_bytes'] / MB:.0f} MB", flush=True)

    seed = args.seeds[0]
    print("memory only: sflv1 with 2 users; splitllm cloud_cut sweep", flush=True)
    sflv1_two = measure(config("sflv1", seed, 1, 1, users=PER_ROUND, eval_chunks=1), args.out / f"mem-sflv1-2users-seed{seed}")
    sweep = []
    for cut in args.cloud_cuts:
        summary = measure(config("splitllm", seed, 1, 1, cloud_cut=cut, eval_chunks=1),
                          args.out / f"mem-splitllm-cloud{cut}-seed{seed}")["summary"]
        sweep.append((cut, summary))

    first = {m: runs[0]["summary"] for m, runs in results.items()}
    ours = first["splitllm"]
    claim = (
        f"Published claim (SplitLLM, PAPERS.md): up to {PUBLISHED:.0%} lower peak memory than two-tier baselines. "
        "Neither PAPERS.md nor the paper's abstract (\"compared to the state-of-the-art benchmarks\") says which "
        "baseline, which memory (one server or all of them) or at how many users the 74% holds; the abstract motivates "
        "the design with \"multiple server-side models concurrently execute on the server\", i.e. per-user server-side "
        "copies, which is our `sflv1`. What we measure (in-process, 8 users, 2 edges, cuts 4 / 16): splitllm's most "
        f"loaded server-side worker (the cloud, {ours['peak_mem_server_bytes'] / MB:.0f} MB) is "
        f"{reduction(ours['peak_mem_server_bytes'], first['sflv1']['peak_mem_server_bytes'])} below sflv1's server "
        f"(8 copies), {reduction(ours['peak_mem_server_bytes'], sflv1_two['summary']['peak_mem_server_bytes'])} below "
        f"sflv1 holding copies for only the round's 2 users, and "
        f"{reduction(ours['peak_mem_server_bytes'], first['sfl']['peak_mem_server_bytes'])} below the one shared sfl "
        f"server. Counting every server-side machine (2 edges + cloud, "
        f"{ours['peak_mem_server_total_bytes'] / MB:.0f} MB), splitllm uses "
        f"{reduction(ours['peak_mem_server_total_bytes'], first['sflv1']['peak_mem_server_total_bytes'])} less than "
        f"sflv1 but {reduction(ours['peak_mem_server_total_bytes'], first['sfl']['peak_mem_server_total_bytes'])} "
        "against sfl (negative: more), since each edge holds its own copy of layers "
        f"[{CUT}, cloud_cut) and the layers stay in memory on several machines; the saving against sfl is per machine, "
        "not in total. Devices hold the same layers in all three, so their peak is the same. Against sflv1 the "
        "saving grows with the number of users (one copy each), against sfl it does not (bench/memory.py shows the "
        "same scaling for memsfl)."
    )
    body = (
        f"SmolLM2-135M-Instruct ({LAYERS} layers), LoRA r={RANK} on q/v, Shakespeare by work over {USERS} users, "
        f"batch {BATCH} x {SEQ} tokens, lr {LR}, {args.rounds} rounds x {args.local_steps} local steps, seeds "
        f"{args.seeds}, eval {EVAL_CHUNKS} chunks of {SEQ} tokens. `splitllm`: {EDGES} edges (user u on edge u % 2, "
        f"each edge's users in turn), user cut {CUT}, `cloud_cut` {CLOUD_CUT}, one shared cloud LoRA. `sflv1` "
        f"(a server-side model copy per user) and `sfl` (one shared server, parallel): cut {CUT}, "
        f"`train.devices_per_round = {PER_ROUND}`, so every method trains {PER_ROUND} users x {args.local_steps} steps x "
        f"{BATCH} sequences per round (the baselines draw their 2 users at random, seeded; splitllm takes each edge's "
        "users in turn: same amount of data, not the same users). Measured in one process on 2 CPU cores; wall "
        "times are not reported (the machine was shared).\n\n"
        + in_process_table(results, sflv1_two, sweep, args.seeds)
        + "\n\n" + claim
    )
    write_section("hierarchy", "Three tiers: SplitLLM vs SplitFed-V1 and shared-server SplitFed (bench/hierarchy.py)", body)


if __name__ == "__main__":
    main()

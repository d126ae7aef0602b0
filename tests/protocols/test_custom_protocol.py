"""A protocol defined entirely in this file: sfl whose server-side stage is split over two server
workers in a chain (device -> server_a -> server_b). It registers itself and runs with
checkpoints and resume, the memory report, sim_s (backhaul hop included) and the gRPC runtime,
and with one device it equals centralized LoRA step by step: a middle tier changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from splitfed.config import ProtocolOptions, RunConfig, load_config
from splitfed.protocols.split import SplitProtocol
from splitfed.registry import register
from splitfed.run import run
from splitfed.topology import Route, StagePlacement, Topology
from tests.conftest import tiny_run_config
from tests.runtime.test_grpc_processes import assert_same_adapters, free_port, serve_with_devices, write_config

PLUGIN = __name__  # device processes import this module (config ``plugins``) to find the protocol


class ChainOptions(ProtocolOptions):
    split_at: int = 1
    """Layers of the server side that server_a runs (server_b runs the rest)."""


@register
class ChainedServerSfl(SplitProtocol):
    name = "test-chain"
    Options = ChainOptions
    common_cut = True

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        rank = max(config.device_rank(u) for u in range(config.devices.count))
        routes = []
        for u, cut in enumerate(cuts):
            middle = cut + config.options.split_at
            routes.append(Route(u, (
                StagePlacement(f"device{u}", "device", 0, cut, True, False, f"device{u}", config.device_rank(u)),
                StagePlacement("server_a", "server", cut, middle, False, False, "a", rank),
                StagePlacement("server_b", "server", middle, total_layers, False, True, "b", rank),
            )))
        return Topology(tuple(routes), aggregator="server_b")


def _records(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _chain(model_dir, corpus_dir, **sections):
    return tiny_run_config(model_dir, corpus_dir, "test-chain", plugins=[PLUGIN], **sections)


def test_one_device_chain_equals_centralized_step_by_step(tiny_model_dir, corpus_dir, tmp_path):
    common = dict(devices={"count": 1, "cuts": [2]}, data={"partition": "iid"}, train={"max_grad_norm": 0.5})
    chain = _chain(tiny_model_dir, corpus_dir, **{"test-chain": {"split_at": 2}}, **common)
    central = tiny_run_config(tiny_model_dir, corpus_dir, "centralized", **common)
    summary = run(chain, tmp_path / "chain", progress=False)
    run(central, tmp_path / "central", progress=False)
    got = [r["loss"] for r in _records(tmp_path / "chain") if r["kind"] == "step"]
    want = [r["loss"] for r in _records(tmp_path / "central") if r["kind"] == "step"]
    assert len(got) == len(want) == chain.train.rounds * chain.train.local_steps
    assert got == pytest.approx(want, rel=1e-5)

    steps = [r for r in _records(tmp_path / "chain") if r["kind"] == "step"]
    assert all(set(r["bytes_by_hop"]) == {"device0->server_a", "server_a->device0", "server_a->server_b",
                                          "server_b->server_a"} for r in steps)
    assert all(r["bytes_by_hop"]["server_a->server_b"] > 0 and r["sim_s"] > 0 for r in steps)
    assert summary["peak_mem_server_bytes"] > 0 and summary["peak_mem_device_bytes"] > 0
    assert summary["trainable_params_server"] > 0 and summary["sim_s"] > 0


def test_chain_resumes_exactly(tiny_llama_dir, corpus_dir, tmp_path):
    def config(rounds: int):
        return _chain(tiny_llama_dir, corpus_dir, devices={"count": 3, "cuts": [2]},
                      train={"rounds": rounds, "local_steps": 2, "devices_per_round": 2})

    run(config(3), tmp_path / "whole", progress=False)
    run(config(2), tmp_path / "resumed", progress=False)
    run(config(3), tmp_path / "resumed", progress=False, resume=True)
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "whole")) == strip(_records(tmp_path / "resumed"))
    checkpoint = json.loads((tmp_path / "whole" / "checkpoints" / "round-0002" / "state.json").read_text())
    assert {"server_a", "server_b", "device0"} <= checkpoint.keys()


@pytest.mark.slow
def test_chain_runs_over_grpc_like_in_process(tiny_llama_dir, corpus_dir, tmp_path):
    config_path = tmp_path / "config.toml"
    write_config(config_path, tiny_llama_dir, corpus_dir, "test-chain", "[2]", free_port())
    text = config_path.read_text().replace("seed = 3\n", f'seed = 3\nplugins = ["{PLUGIN}"]\n')
    config_path.write_text(text)  # top-level key: before the first section
    remote = serve_with_devices(config_path, tmp_path / "grpc")
    local = run(load_config(config_path), tmp_path / "inproc", progress=False)
    assert_same_adapters(tmp_path / "grpc", tmp_path / "inproc")
    assert remote["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)
    assert remote["sim_s"] == pytest.approx(local["sim_s"], rel=1e-3)

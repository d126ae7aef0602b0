"""The Ray runtime on a local Ray: devices in host actors train exactly like in-process, with
per-device codecs and error feedback kept in the actors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitfed.run import run
from splitfed.deploy import run_on_ray
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.slow  # real processes


def _inproc_and_ray(model_dir, corpus_dir, tmp_path, protocol: str, **sections) -> tuple[dict, dict]:
    """The summaries of an in-process run and of the same config on Ray (2 host actors), whose adapters match."""
    local = run(tiny_run_config(model_dir, corpus_dir, protocol, **sections), tmp_path / "inproc", progress=False)
    config = tiny_run_config(model_dir, corpus_dir, protocol, runtime={"kind": "ray", "ray_hosts": 2}, **sections)
    remote = run_on_ray(config, tmp_path / "ray", progress=False)
    local_adapter = load_file(tmp_path / "inproc" / "adapter" / "adapter_model.safetensors")
    remote_adapter = load_file(tmp_path / "ray" / "adapter" / "adapter_model.safetensors")
    for key in local_adapter:
        torch.testing.assert_close(remote_adapter[key], local_adapter[key], atol=1e-5, rtol=1e-5, msg=key)
    assert remote["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)
    return local, remote


def test_ray_runtime_matches_in_process(tiny_llama_dir, corpus_dir, tmp_path):
    sections = dict(devices={"count": 4, "cuts": [1, 2, 4]}, data={"partition": "iid"},
                    train={"rounds": 2, "local_steps": 2, "devices_per_round": 3},
                    compression={"activations_per_device": ["quant:8", "topk:0.5 > quant:4", "none", "fp16"],
                                 "gradients": "quant:8 > zstd", "error_feedback": True})
    local, remote = _inproc_and_ray(tiny_llama_dir, corpus_dir, tmp_path, "memsfl", **sections)
    assert (remote["activations_bytes"], remote["gradients_bytes"]) == (local["activations_bytes"], local["gradients_bytes"])


def test_ray_hsplitlora_with_sampled_devices_matches_in_process(tiny_llama_dir, corpus_dir, tmp_path):
    """Devices left out of a round miss its merge and catch up later; devices of one host actor share a base
    (each merge lands once); importance reports and relayouts cross the actor boundary."""
    sections = dict(devices={"count": 4, "cuts": [], "memory_mb": [1.0, 2.0, 4.0, 2.0], "ranks": [2, 4, 8, 4]},
                    data={"partition": "iid"}, aggregation={"method": "stack"},
                    hsplitlora={"reconfigure_threshold": 0.0},
                    train={"rounds": 3, "local_steps": 2, "devices_per_round": 2})
    local = run(tiny_run_config(tiny_llama_dir, corpus_dir, "hsplitlora", **sections), tmp_path / "inproc",
                progress=False)
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "hsplitlora", runtime={"kind": "ray", "ray_hosts": 2},
                             **sections)
    remote = run_on_ray(config, tmp_path / "ray", progress=False)
    assert remote["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)
    assert remote["configurations"] == local["configurations"]
    assert remote["export"]["adapter_eval_loss"] == pytest.approx(local["export"]["adapter_eval_loss"], rel=1e-5)


def test_ray_three_tiers_match_in_process(tiny_llama_dir, corpus_dir, tmp_path):
    """Edges are Ray actors that relay to their users' host actors and keep their activations."""
    sections = dict(devices={"count": 4, "cuts": [1, 2]}, data={"partition": "iid"},
                    train={"rounds": 2, "local_steps": 2}, splitllm={"edges": 2, "cloud_cut": 4},
                    compression={"activations": "quant:8", "error_feedback": True})
    local, remote = _inproc_and_ray(tiny_llama_dir, corpus_dir, tmp_path, "splitllm", **sections)
    assert remote["peak_mem_edge_bytes"] == local["peak_mem_edge_bytes"] > 0

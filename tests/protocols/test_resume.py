"""A run resumed from its last checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from splitfed.run import run
from tests.conftest import tiny_run_config


@pytest.mark.parametrize("protocol", ["sfl", "memsfl", "fedlora", "splitllm"])
def test_resume_matches_uninterrupted_run(tiny_llama_dir, corpus_dir, tmp_path, protocol):
    def config(rounds: int):
        three_tier = {"splitllm": {"edges": 2, "cloud_cut": 4}} if protocol == "splitllm" else {}
        return tiny_run_config(tiny_llama_dir, corpus_dir, protocol, devices={"count": 3, "cuts": [2] if protocol == "sfl" else [1, 3]},
                               train={"rounds": rounds, "local_steps": 2, "devices_per_round": 0 if three_tier else 2},
                               **three_tier)

    run(config(3), tmp_path / "whole", progress=False)
    run(config(2), tmp_path / "resumed", progress=False)  # "crashes" after round 2 of 3
    run(config(3), tmp_path / "resumed", progress=False, resume=True)

    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]

    assert records("whole") == records("resumed")


def test_resume_without_checkpoint_is_a_clear_error(tiny_llama_dir, corpus_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run(tiny_run_config(tiny_llama_dir, corpus_dir, "sfl"), tmp_path / "empty", progress=False, resume=True)


@pytest.mark.parametrize("interruption", ["next forward", "state import"])
def test_an_unfinished_step_leaves_no_gradient_behind(tiny_llama_dir, corpus_dir, interruption):
    """A device whose step was cut off after backward (server killed, device dropped) must not
    add those gradients to its next step: the next step starts clean."""
    from splitfed.run import build_protocol, plan_run
    from splitfed.wire.messages import Message

    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", devices={"count": 1, "cuts": [2]})
    protocol, _ = build_protocol(plan_run(config), log=lambda record: None)
    device = protocol.workers["device0"].worker
    saved = device.export_state()
    sent = device.forward(None, 0, 0)
    params = device.slot(None).params  # the adapter the slot trains on for this turn
    grad = torch.ones_like(sent.tensors["hidden"])
    values = {"loss": 1.0, "tokens": 1, "grad_scale": 1.0}
    device.backward(None, Message("activation_grad", "server", 0, 0, {"grad": grad}, values))
    assert any(p.grad is not None for p in params)  # the optimizer step never comes
    if interruption == "next forward":
        device.forward(None, 0, 1)
    else:
        device.import_state(*saved)
    assert all(p.grad is None for p in params)

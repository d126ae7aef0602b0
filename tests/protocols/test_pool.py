"""The adapter pool (``adapters.pool``): slots that take turns on a few adapters of the model give the
same numbers, bit for bit, as one adapter per slot; a slot's state survives its adapter going to another."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.pool import AdapterPool
from splitfed.config import TrainSection
from splitfed.data.batches import TokenDataset
from splitfed.models.families import family_for
from splitfed.models.loading import load_model
from splitfed.models.split import Stage, StageSpec
from splitfed.roles.worker import StageWorker
from splitfed.run import run
from splitfed.wire.messages import Message
from tests.conftest import tiny_run_config

FOUR = {"count": 4, "cuts": [1, 2, 2, 3]}
PROTOCOLS = {
    # protocol: sections; 2 of 4 devices per round, so slots change hands between rounds
    "sfl": {"devices": {"count": 4, "cuts": [2]}},
    "sflv1": {"devices": FOUR},
    "memsfl": {"devices": FOUR},
    "memsfl scheduled": {"devices": FOUR, "memsfl": {"scheduler": "random"}},
    "fedlora": {"devices": FOUR},
    "hsplitlora": {"devices": {"count": 4, "cuts": [], "memory_mb": [1.0, 2.0, 4.0, 2.0]},
                   "aggregation": {"method": "stack"}},
    "splitllm": {"devices": FOUR, "splitllm": {"edges": 2, "cloud_cut": 4}, "train": {"devices_per_round": 0}},
    "sfl compressed": {"devices": {"count": 4, "cuts": [2]},
                       "compression": {"activations": "topk:0.5", "gradients": "quant:8", "error_feedback": True}},
}


def _run(model_dir, corpus_dir, out, name: str, slots: str) -> tuple[list[dict], list[float]]:
    sections = {k: dict(v) for k, v in PROTOCOLS[name].items()}
    sections["train"] = {"rounds": 3, "local_steps": 2, "devices_per_round": 2, "keep_checkpoints": 0,
                         **sections.get("train", {})}
    config = tiny_run_config(model_dir, corpus_dir, name.split()[0], runtime={"adapter_slots": slots}, **sections)
    run(config, out, progress=False)
    rounds = [load_file(out / "checkpoints" / f"round-{r:04d}" / "state.safetensors") for r in range(3)]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "step"]
    return rounds, losses


@pytest.mark.parametrize("name", PROTOCOLS)
def test_pool_gives_the_numbers_of_one_adapter_per_device(tiny_llama_dir, corpus_dir, tmp_path, name):
    pooled, pooled_losses = _run(tiny_llama_dir, corpus_dir, tmp_path / "pool", name, "pool")
    own, own_losses = _run(tiny_llama_dir, corpus_dir, tmp_path / "own", name, "per_device")
    assert pooled_losses == own_losses
    for r, (a, b) in enumerate(zip(pooled, own)):
        global_keys = [k for k in b if k.startswith("global/")]
        assert global_keys and all(torch.equal(a[k], b[k]) for k in global_keys), f"round {r}"


@pytest.fixture()
def two_devices(tiny_llama_dir):
    """Two device workers of one model sharing a pool, each with a first-stage slot on layers [0, 2)."""
    model = load_model(str(tiny_llama_dir))
    family = family_for(model.config)
    pool = AdapterPool(family)
    layout = AdapterLayout(range(2), ("q_proj", "v_proj"), 4, 2.0)
    stage = Stage(model, StageSpec(0, 2, True, False), family)
    tokens = torch.randint(0, model.config.vocab_size, (8, 16))  # (rows, seq)
    data = TokenDataset(tokens, tokens.clone(), torch.ones_like(tokens))
    workers = []
    for u in range(2):
        worker = StageWorker(f"device{u}", TrainSection(batch_size=2), pool)
        worker.add_slot("device", stage, layout, data, seed=u)
        initial = {k: torch.randn(shape) for k, shape in worker.slot(None).shapes().items()}
        worker.download(None, Message("adapter_download", "aggregator", 0, 0, initial))
        workers.append(worker)
    return pool, workers


def _step(worker: StageWorker) -> None:
    sent = worker.forward(None, 0, 0)
    grad = torch.randn_like(sent.tensors["hidden"])
    worker.backward(None, Message("activation_grad", "server", 0, 0, {"grad": grad}, {"grad_scale": 1.0}))
    worker.apply(None, 1.0, 1e-2)


def test_a_slot_state_round_trips_through_the_pool_exactly(two_devices):
    pool, (first, second) = two_devices
    _step(first)
    slot = first.slot(None)
    held_adapter = slot.adapter
    factors, optimizer = slot.factors(), slot.optimizer_state()
    moments = {k: v.clone() for k, v in optimizer["state"][0].items()}
    _step(second)  # the idle first slot gives its adapter to the second and is parked as tensors
    assert pool.size() == 1 and slot.adapter is None and held_adapter.holder is second.slot(None)
    assert slot.factors().keys() == factors.keys()
    assert all(torch.equal(slot.factors()[k], v) for k, v in factors.items())
    slot.bind()  # back on an adapter of the model: the same values and optimizer moments
    assert all(torch.equal(p, factors[k]) for k, p in slot.adapter.params.items())
    assert all(torch.equal(v, moments[k]) for k, v in slot.optimizer_state()["state"][0].items())


def test_a_busy_slot_keeps_its_adapter_and_the_pool_grows(two_devices):
    pool, (first, second) = two_devices
    first.forward(None, 0, 0)  # a forward waiting for its backward: its adapter cannot be lent
    second.forward(None, 0, 0)
    assert pool.size() == 2
    assert first.slot(None).adapter is not second.slot(None).adapter


def test_exported_state_of_parked_and_bound_slots_is_the_same(two_devices):
    _, (first, second) = two_devices
    _step(first)
    bound = first.export_state()
    _step(second)  # parks the first
    parked = first.export_state()
    assert bound[1] == parked[1]
    assert bound[0].keys() == parked[0].keys() and all(torch.equal(bound[0][k], parked[0][k]) for k in bound[0])
    first.import_state(*parked)
    assert first.export_state()[1] == parked[1]

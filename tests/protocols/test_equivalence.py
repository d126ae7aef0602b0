"""The invariants of DESIGN.md, checked on tiny GPT-2 and Llama models:
split == centralized == plain PEFT step by step; memsfl == sflv1 at equal cuts with one base
model instead of N; the exported adapter reproduces the reported eval loss; determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from splitfed.data.batches import BatchStream, iterate_batches
from splitfed.models.loading import load_model
from splitfed.seeding import Purpose, derive_seed
from splitfed.run import build_protocol, plan_run, run
from tests.conftest import tiny_run_config


def _step_losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def _plain_peft_losses(config, steps: int) -> list[float]:
    """Plain PEFT LoRA training written out here: same init, batches, optimizer and clipping."""
    protocol, data = build_protocol(plan_run(config), log=lambda record: None)
    initial = protocol.aggregator.global_state
    lora = config.lora
    model = get_peft_model(
        load_model(config.model.source),
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.targets,
                   fan_in_fan_out=protocol.family.fan_in_fan_out),
    )
    set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in initial.items()})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr)
    stream = BatchStream(data.train[0], config.train.batch_size, derive_seed(config.seed, Purpose.BATCHES, 0))
    losses = []
    for _ in range(steps):
        batch = stream.next_batch()
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_one_device_sfl_equals_centralized_and_plain_peft(tiny_model_dir, corpus_dir, tmp_path, mode):
    common = dict(devices={"count": 1, "cuts": [3]}, data={"partition": "iid"}, train={"max_grad_norm": 0.5})
    sfl = tiny_run_config(tiny_model_dir, corpus_dir, "sfl", sfl={"mode": mode}, **common)
    centralized = tiny_run_config(tiny_model_dir, corpus_dir, "centralized", **common)
    run(sfl, tmp_path / "sfl", progress=False)
    run(centralized, tmp_path / "central", progress=False)
    split_losses = _step_losses(tmp_path / "sfl")
    central_losses = _step_losses(tmp_path / "central")
    reference = _plain_peft_losses(sfl, len(split_losses))
    assert len(split_losses) == sfl.train.rounds * sfl.train.local_steps
    assert split_losses[-1] < split_losses[0]  # it does learn
    for got, central, ref in zip(split_losses, central_losses, reference):
        assert got == pytest.approx(ref, rel=1e-5)
        assert central == pytest.approx(ref, rel=1e-5)


def _round_states(run_dir, rounds: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for r in range(rounds):
        tensors = load_file(run_dir / "checkpoints" / f"round-{r:04d}" / "state.safetensors")
        states.append({k: v for k, v in tensors.items() if k.startswith("global/")})
    return states


def test_memsfl_equals_sflv1_at_equal_cuts_with_one_base_model(tiny_model_dir, corpus_dir, tmp_path):
    devices = {"count": 3, "cuts": [2]}
    summaries = {}
    for protocol in ("memsfl", "sflv1"):
        config = tiny_run_config(tiny_model_dir, corpus_dir, protocol, devices=devices, data={"partition": "iid"})
        summaries[protocol] = run(config, tmp_path / protocol, progress=False)
    mem_states = _round_states(tmp_path / "memsfl", 2)
    v1_states = _round_states(tmp_path / "sflv1", 2)
    for mem, v1 in zip(mem_states, v1_states):
        assert mem.keys() == v1.keys()
        for key in mem:
            torch.testing.assert_close(mem[key], v1[key], atol=1e-6, rtol=1e-5, msg=key)

    # Server-side base weights: memsfl holds one model, sflv1 one copy per device.
    config = tiny_run_config(tiny_model_dir, corpus_dir, "memsfl", devices=devices, data={"partition": "iid"})
    memsfl, _ = build_protocol(plan_run(config), log=lambda record: None)
    v1, _ = build_protocol(plan_run(config.model_copy(update={"protocol": "sflv1"})), log=lambda record: None)
    assert len({id(s.stage.model) for s in memsfl.workers["server"].worker.slots.values()}) == 1
    assert len({id(s.stage.model) for s in v1.workers["server"].worker.slots.values()}) == 3
    assert summaries["sflv1"]["peak_mem_server_bytes"] > 2 * summaries["memsfl"]["peak_mem_server_bytes"]


@pytest.mark.parametrize(("method", "ranks"), [("fedavg", []), ("zeropad", [2, 4, 8]), ("svd", [2, 4, 8])])
def test_exported_adapter_reproduces_reported_eval_loss(tiny_model_dir, corpus_dir, tmp_path, method, ranks):
    """Every aggregation method, mixed ranks included, exports what the summary evaluated."""
    config = tiny_run_config(tiny_model_dir, corpus_dir, "memsfl", aggregation={"method": method},
                             devices={"count": 4, "cuts": [1, 2, 4], "ranks": ranks})
    summary = run(config, tmp_path / "run", progress=False)
    model = PeftModel.from_pretrained(load_model(config.model.source), str(tmp_path / "run" / "adapter"))
    _, data = build_protocol(plan_run(config), log=lambda record: None)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in iterate_batches(data.eval, config.train.eval_batch_size):
            count = int((batch.labels[:, 1:] != -100).sum())
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            loss_sum, tokens = loss_sum + float(out.loss) * count, tokens + count
    assert loss_sum / tokens == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    assert math.isclose(summary["final_eval_ppl"], math.exp(summary["final_eval_loss"]))


@pytest.mark.parametrize("protocol", ["sfl", "memsfl", "sflv1", "fedlora", "centralized"])
def test_same_seed_same_metrics(tiny_llama_dir, corpus_dir, tmp_path, protocol):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, protocol, devices={"count": 4, "cuts": [2]},
                             train={"rounds": 2, "local_steps": 2, "devices_per_round": 2})
    first = run(config, tmp_path / "a", progress=False)
    second = run(config, tmp_path / "b", progress=False)

    def strip(path):
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]

    assert strip(tmp_path / "a") == strip(tmp_path / "b")
    assert {k: v for k, v in first.items() if k != "wall_s"} == {k: v for k, v in second.items() if k != "wall_s"}

"""The ``stack`` aggregation in whole runs: every round's exact aggregate goes into the base weights,
adapters restart, and a role catches up on the merges it missed."""

from __future__ import annotations

import pytest
import torch

from splitfed.adapters.aggregate import A_SUFFIX, B_SUFFIX
from splitfed.adapters.merge import apply_merges, merge_key, merged_versions
from splitfed.models.families import family_for
from splitfed.models.loading import load_model
from splitfed.run import build_protocol, plan_run, run
from tests.conftest import tiny_run_config


def _stack_config(model_dir, corpus_dir, protocol="memsfl", **sections):
    sections = {"aggregation": {"method": "stack"}, "devices": {"count": 3, "cuts": [1, 2, 3], "ranks": [2, 4, 8]},
                **sections}
    return tiny_run_config(model_dir, corpus_dir, protocol, **sections)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_each_round_adds_its_exact_aggregate_to_the_base_and_restarts_the_adapter(tiny_llama_dir, corpus_dir):
    config = _stack_config(tiny_llama_dir, corpus_dir, train={"rounds": 1})
    protocol, _ = build_protocol(plan_run(config), lambda record: None)
    before = _base_weights(protocol.model)
    protocol.train_round(0, protocol.participants(0))
    assert protocol.aggregator.version == 1
    after = _base_weights(protocol.model)
    deltas = protocol.aggregator.accumulated_deltas()
    assert deltas, "the round merged nothing"
    for module, delta in deltas.items():
        key = f"{module}.base_layer.weight"
        torch.testing.assert_close(after[key].double() - before[key].double(), delta, atol=1e-6, rtol=0)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{m}.base_layer.weight" for m in deltas}  # nothing else moved
    state = protocol.aggregator.global_state
    assert all(bool((t == 0).all()) for k, t in state.items() if k.endswith(B_SUFFIX))
    assert all(bool(t.abs().sum() > 0) for k, t in state.items() if k.endswith(A_SUFFIX))


def test_stacked_merge_is_the_weighted_sum_of_every_route_s_products(tiny_llama_dir, corpus_dir):
    """Merge 0 = sum_k p_k scaling B_k A_k over the routes that hold each layer (device part or server part)."""
    config = _stack_config(tiny_llama_dir, corpus_dir, train={"rounds": 1})
    protocol, _ = build_protocol(plan_run(config), lambda record: None)
    captured = {}
    aggregate = protocol.aggregator.aggregate
    protocol.aggregator.aggregate = lambda uploads: (captured.setdefault("uploads", uploads), aggregate(uploads))
    protocol.train_round(0, protocol.participants(0))
    uploads = captured["uploads"]
    scaling = config.lora.alpha / config.lora.rank
    total = sum(u.weight for u in uploads)
    for module, delta in protocol.aggregator.accumulated_deltas().items():
        holders = [u for u in uploads if module + A_SUFFIX in u.state]
        assert len(holders) == 3  # every route holds every layer: on its device or on its server slot
        expected = sum((u.weight / total) * scaling * (u.state[module + B_SUFFIX].double() @ u.state[module + A_SUFFIX].double())
                       for u in holders)
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)


def test_a_role_that_missed_merges_catches_up_and_a_shared_base_merges_once(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    family = family_for(model.config)
    path = "model.layers.1.self_attn.q_proj"
    weight = model.get_submodule(path).weight
    original = weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    merges = {}
    for k in range(3):
        merges[merge_key(k, path + A_SUFFIX)] = torch.randn(2, weight.shape[1], generator=generator)
        merges[merge_key(k, path + B_SUFFIX)] = torch.randn(weight.shape[0], 2, generator=generator)
    expected = original + sum(merges[merge_key(k, path + B_SUFFIX)] @ merges[merge_key(k, path + A_SUFFIX)] for k in range(3))
    first = {k: v for k, v in merges.items() if k.startswith("0/")}
    assert apply_merges(model, first, family, range(2), 0, 1) == [0, 1]
    assert apply_merges(model, merges, family, range(2), 0, 3) == [0, 1]  # merges 1 and 2 only: 0 is there
    assert apply_merges(model, merges, family, range(2), 0, 3) == []  # a second role on this base: nothing again
    torch.testing.assert_close(weight, expected, atol=1e-5, rtol=0)
    assert merged_versions(model) == {0: 3, 1: 3}
    with pytest.raises(ValueError, match="layer 2 holds 0 merges; the message brings merges 2..2, so 2 are missing"):
        apply_merges(model, {}, family, range(2, 3), 2, 3)


def test_stack_run_resumes_to_the_same_numbers(tiny_llama_dir, corpus_dir, tmp_path):
    config = _stack_config(tiny_llama_dir, corpus_dir, train={"rounds": 2, "local_steps": 2})
    whole = run(config, tmp_path / "whole", progress=False)
    first = _stack_config(tiny_llama_dir, corpus_dir, train={"rounds": 1, "local_steps": 2})
    run(first, tmp_path / "split", progress=False)
    resumed = run(config, tmp_path / "split", progress=False, resume=True)
    assert resumed["final_eval_loss"] == pytest.approx(whole["final_eval_loss"], abs=1e-6)


@pytest.mark.parametrize("export_rank", [1, 64])
def test_exported_merged_model_and_adapter_reproduce_the_summary(tiny_llama_dir, corpus_dir, tmp_path, export_rank):
    """merged/ loads with from_pretrained and gives summary.json's eval loss; adapter/ on the original base
    gives the export's adapter_eval_loss, and its error against the merged weights is the one reported."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from splitfed.export import heldout_loss, load_exported_adapter
    from splitfed.models.loading import load_tokenizer
    from splitfed.run import build_data

    config = _stack_config(tiny_llama_dir, corpus_dir, aggregation={"method": "stack", "export_rank": export_rank},
                           train={"rounds": 2, "local_steps": 2})
    out = tmp_path / "run"
    summary = run(config, out, progress=False)
    assert json.loads((out / "summary.json").read_text())["export"] == summary["export"]
    rows = build_data(plan_run(config), load_tokenizer(str(tiny_llama_dir))).eval
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    merged_loss, _ = heldout_loss(merged, rows, 8)
    assert merged_loss == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    adapter_loss, _ = heldout_loss(load_exported_adapter(str(tiny_llama_dir), out / "adapter"), rows, 8)
    assert adapter_loss == pytest.approx(summary["export"]["adapter_eval_loss"], rel=1e-6)

    original = load_model(str(tiny_llama_dir)).state_dict()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    scaling = config.lora.alpha / config.lora.rank
    tail = norm = 0.0
    for name, weight in merged.state_dict().items():
        module = name.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            continue
        delta = weight.double() - original[name].double()
        approx = scaling * adapter[f"base_model.model.{module}.lora_B.weight"].double() @ a.double()
        tail, norm = tail + float((delta - approx).pow(2).sum()), norm + float(delta.pow(2).sum())
    error = summary["export"]["adapter_rel_error"]
    assert (tail / norm) ** 0.5 == pytest.approx(error, abs=1e-4)
    if export_rank == 64:  # at least the summed ranks of two merges (2 x (2 + 4 + 8)): exact
        assert error < 1e-5
        assert adapter_loss == pytest.approx(merged_loss, rel=1e-5)
    else:
        assert error > 0.1  # rank 1 cannot hold two rounds of three devices' updates


@pytest.mark.parametrize("protocol", ["sflv1", "sfl", "fedlora"])
def test_stack_runs_with_every_protocol_and_sflv1_equals_memsfl(tiny_llama_dir, corpus_dir, tmp_path, protocol):
    """sflv1's server slots each run on their own base copy: the merges reach every copy, so at equal cuts it
    trains exactly like memsfl (one shared base). sfl and fedlora merge too (one shared server slot; whole models)."""
    cuts = [2, 2, 2] if protocol == "sfl" else [1, 2, 3]
    sections = {"devices": {"count": 3, "cuts": cuts, "ranks": [2, 4, 8]}, "train": {"rounds": 2, "local_steps": 2}}
    summary = run(_stack_config(tiny_llama_dir, corpus_dir, protocol, **sections), tmp_path / protocol, progress=False)
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    if protocol == "sflv1":
        memsfl = run(_stack_config(tiny_llama_dir, corpus_dir, "memsfl", **sections), tmp_path / "memsfl", progress=False)
        assert summary["final_eval_loss"] == pytest.approx(memsfl["final_eval_loss"], abs=1e-5)

"""A split model computes exactly what the unsplit model computes, forward and backward."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from splitfed.models.families import family_for
from splitfed.models.loading import load_model, load_stage_model
from splitfed.models.split import StageSpec, plan_stages, position_ids_for, split_model, token_loss_sum


def _batch(vocab: int, batch: int = 3, seq: int = 16, pad_last: int = 4):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, seq - pad_last :] = 0  # one right-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def _random_cuts(total: int, stages: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(1, total), stages - 1))


def _run_stages(stages, input_ids, attention_mask):
    positions = position_ids_for(attention_mask)
    hidden = input_ids
    for stage in stages:
        hidden = stage(hidden, attention_mask, positions)
    return hidden


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staged_forward_equals_unsplit_logits(tiny_model_dir, stages, seed):
    model = load_model(str(tiny_model_dir))
    input_ids, attention_mask, _ = _batch(model.config.vocab_size)
    cuts = _random_cuts(model.config.num_hidden_layers, stages, seed)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        got = _run_stages(split_model(model, cuts), input_ids, attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_staged_backward_equals_unsplit_lora_gradients(tiny_model_dir, stages, seed):
    """Backprop through stage boundaries (detach + send + backward(grad)) == one autograd graph."""
    family = family_for(load_model(str(tiny_model_dir)).config)
    targets = ["q_proj", "v_proj"] if family.name == "llama" else ["c_attn"]

    def lora_model():
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian",
                            fan_in_fan_out=family.fan_in_fan_out)
        peft_model = get_peft_model(load_model(str(tiny_model_dir)), config)
        return peft_model

    reference, split = lora_model(), lora_model()
    input_ids, attention_mask, labels = _batch(reference.config.vocab_size)
    reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    base = split.base_model.model
    cuts = _random_cuts(base.config.num_hidden_layers, stages, seed)
    positions = position_ids_for(attention_mask)
    boundary_outputs, inputs = [], input_ids
    for stage in split_model(base, cuts):  # each stage gets a detached copy, as over a network
        received = inputs if stage.spec.first else inputs.detach().requires_grad_(True)
        out = stage(received, attention_mask, positions)
        boundary_outputs.append((received, out))
        inputs = out
    loss_sum, count = token_loss_sum(boundary_outputs[-1][1], labels)
    (loss_sum / count).backward()
    for (received, _), (_, previous_out) in reversed(list(zip(boundary_outputs[1:], boundary_outputs[:-1]))):
        previous_out.backward(received.grad)

    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in split.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_stage_process_loads_only_its_own_weights(tiny_model_dir):
    full = load_model(str(tiny_model_dir))
    total = full.config.num_hidden_layers
    input_ids, attention_mask, _ = _batch(full.config.vocab_size)
    device_spec, server_spec = plan_stages(total, [2])
    device_model = load_stage_model(str(tiny_model_dir), device_spec)
    server_model = load_stage_model(str(tiny_model_dir), server_spec)
    from splitfed.models.split import Stage

    with torch.no_grad():
        expected = full(input_ids=input_ids, attention_mask=attention_mask).logits
        got = _run_stages([Stage(device_model, device_spec), Stage(server_model, server_spec)], input_ids, attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    family = family_for(full.config)
    layers = device_model.get_submodule(family.layers_path)
    assert all(p.device.type == "cpu" for p in layers[0].parameters())
    assert all(p.device.type == "meta" for p in layers[total - 1].parameters())
    materialized = sum(p.numel() for p in device_model.parameters() if p.device.type != "meta")
    assert materialized < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize(
    ("cuts", "message"),
    [([0], "strictly increasing"), ([6], "strictly increasing"), ([3, 3], "strictly increasing"), ([4, 2], "strictly")],
)
def test_plan_stages_rejects_bad_cuts(cuts, message):
    with pytest.raises(ValueError, match=message):
        plan_stages(6, cuts)


def test_plan_stages_three_tiers():
    assert plan_stages(6, [2, 4]) == [StageSpec(0, 2, True, False), StageSpec(2, 4, False, False), StageSpec(4, 6, False, True)]

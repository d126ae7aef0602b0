"""The cost model against references: FLOPs against torch's FlopCounterMode on tiny models
(eager attention, so the attention products are counted too), message and adapter bytes
against their definitions, and predicted peak memory against what the roles measure."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from splitfed.adapters.lora import activate, add_adapter, lora_layers, make_lora_config
from splitfed.models.families import family_for
from splitfed.models.split import Stage, StageSpec, position_ids_for, token_loss_sum
from splitfed.system.costs import activation_bytes, adapter_bytes, layer_costs, stage_flops
from tests.conftest import TINY_CONFIGS

BATCH, SEQ, RANK = 3, 16, 4


def _counted_flops(family: str, targets: list[str], spec: StageSpec) -> tuple[int, int]:
    config = TINY_CONFIGS[family]()
    config._attn_implementation = "eager"  # SDPA on CPU is invisible to FlopCounterMode
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    fam = family_for(config)
    add_adapter(model, "a", make_lora_config(fam, targets, RANK, 2.0, list(range(config.num_hidden_layers)), 0.0))
    activate(lora_layers(model), ["a"])
    stage = Stage(model, spec, fam)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    inputs = ids if spec.first else torch.randn(BATCH, SEQ, config.hidden_size, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = stage(inputs, mask, position_ids_for(mask))
        forward = counter.get_total_flops()
        loss = token_loss_sum(out, ids)[0] if spec.last else out.square().sum()
        loss.backward()
        total = counter.get_total_flops()
    return forward, total - forward


@pytest.mark.parametrize(
    "family, targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("llama", ["v_proj", "down_proj"]),
        ("llama", ["gate_proj"]),
        ("gpt2", ["c_attn"]),
        ("gpt2", ["c_fc", "c_proj"]),
    ],
)
@pytest.mark.parametrize(
    "spec", [StageSpec(0, 2, True, False), StageSpec(2, 5, False, False), StageSpec(3, 6, False, True), StageSpec(0, 6, True, True)]
)
def test_stage_flops_match_counted_matmuls(family, targets, spec):
    costs = layer_costs(TINY_CONFIGS[family](), targets)
    predicted = stage_flops(costs, spec.end - spec.start, BATCH, SEQ, RANK, spec.first, spec.last)
    forward, backward = _counted_flops(family, targets, spec)
    assert (predicted.forward, predicted.backward) == (forward, backward)


def test_message_and_adapter_bytes():
    costs = layer_costs(TINY_CONFIGS["llama"](), ["q_proj", "v_proj"])
    assert activation_bytes(costs, 8, 128) == 8 * 128 * 32 * 4
    assert activation_bytes(costs, 8, 128, bytes_per_element=1) == 8 * 128 * 32
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8): rank x (in + out) per module
    assert adapter_bytes(costs, 3, 4) == 3 * 4 * ((32 + 32) + (32 + 16)) * 4

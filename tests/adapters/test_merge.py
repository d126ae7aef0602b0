"""Stacking heterogeneous adapters is exact, and merging a delta into the base leaves the model's function unchanged."""

from __future__ import annotations

import random

import pytest
import torch

from splitfed.adapters.aggregate import stack_pair
from splitfed.adapters.merge import merge_deltas, module_deltas, restart_adapter


@pytest.mark.parametrize("seed", range(5))
def test_stack_reproduces_the_weighted_sum_of_products_exactly(seed):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    holders = rng.randint(1, 5)
    ranks = [rng.choice([1, 2, 4, 8, 16]) for _ in range(holders)]
    a = [torch.randn(r, 12, generator=generator, dtype=torch.float64) for r in ranks]
    b = [torch.randn(7, r, generator=generator, dtype=torch.float64) for r in ranks]
    weights = [rng.uniform(0.1, 10) for _ in ranks]
    a_cat, b_cat = stack_pair(a, b, weights)
    assert a_cat.shape == (sum(ranks), 12) and b_cat.shape == (7, sum(ranks))
    expected = sum(w * (bk @ ak) for ak, bk, w in zip(a, b, weights)) / sum(weights)
    torch.testing.assert_close(b_cat @ a_cat, expected, atol=1e-6, rtol=0)


def test_stack_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one \\(A, B, weight\\) per participant"):
        stack_pair([torch.zeros(1, 2)], [], [1.0])


def test_merged_base_with_a_fresh_adapter_gives_the_same_logits(tiny_model_dir):
    from splitfed.adapters.layout import AdapterLayout
    from splitfed.adapters.lora import add_adapter, get_adapter_state, layout_config, lora_layers, set_adapter_state
    from splitfed.models.families import family_for
    from splitfed.models.loading import load_model

    model = load_model(str(tiny_model_dir))
    family = family_for(model.config)
    targets = {"llama": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "c_fc")}[family.name]
    layout = AdapterLayout(range(0, 6), targets, 4, 2.0)
    add_adapter(model, "a", layout_config(family, layout))
    torch.manual_seed(0)
    set_adapter_state(model, "a", {k: torch.randn_like(v) * 0.3 for k, v in get_adapter_state(model, "a").items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        scaling = next(iter(lora_layers(model))).scaling["a"]
        merge_deltas(model, module_deltas(get_adapter_state(model, "a"), scaling), family.fan_in_fan_out)
        restart_adapter(model, "a")
        after = model(input_ids=ids).logits
    assert all(bool((t == 0).all()) for k, t in get_adapter_state(model, "a").items() if ".lora_B." in k)
    assert not torch.allclose(before, load_model(str(tiny_model_dir))(input_ids=ids).logits, atol=1e-3)  # it mattered
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)

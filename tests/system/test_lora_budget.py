"""HSplitLoRA configuration from budgets: never above the budget, more rank to more important matrices."""

from __future__ import annotations

import random

import pytest

from splitfed.models.loading import load_model_config
from splitfed.system.lora_budget import BudgetError, configure_device, matrix_lora_bytes, ranking_shift
from splitfed.system.costs import layer_costs, stage_memory

MB = 1 << 20


@pytest.fixture
def costs(tiny_llama_dir):
    return layer_costs(load_model_config(str(tiny_llama_dir)), ["q_proj", "k_proj", "v_proj", "o_proj"])


def _importance(costs, layers: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {(layer, lin.path): rng.random() for layer in range(layers) for lin in costs.linears if lin.lora}


def _estimate(costs, config, batch: int, seq: int) -> float:
    shapes = {lin.path: (lin.in_features, lin.out_features) for lin in costs.linears}
    base = stage_memory(costs, config.cut, 0, batch, seq, first=True, last=False).total
    return base + sum(matrix_lora_bytes(*shapes[path], rank, batch, seq) for (_, path), rank in config.ranks.items())


def test_random_budgets_are_never_exceeded_and_the_same_seed_gives_the_same_configuration(costs):
    floor = stage_memory(costs, 1, 2, 4, 32, first=True, last=False).total
    rng = random.Random(0)
    for trial in range(50):
        budget = floor * rng.uniform(1.05, 6.0)
        importance = _importance(costs, 6, seed=trial)
        config = configure_device(costs, importance, budget, max_cut=5, batch=4, seq=32)
        assert 1 <= config.cut <= 5 and config.ranks
        assert config.memory_bytes <= budget and _estimate(costs, config, 4, 32) == pytest.approx(config.memory_bytes, abs=1)
        assert configure_device(costs, importance, budget, max_cut=5, batch=4, seq=32) == config


def test_more_important_matrices_of_one_shape_get_no_less_rank(costs):
    """A budget for 3 layers plus about five rank-16 LoRAs: the matrices compete for it."""
    budget = stage_memory(costs, 3, 0, 4, 32, first=True, last=False).total + 5 * matrix_lora_bytes(32, 32, 16, 4, 32)
    importance = _importance(costs, 6, seed=1)
    config = configure_device(costs, importance, budget, max_cut=3, batch=4, seq=32)
    assert config.cut == 3
    square = sorted((m for m in importance if m[1] in ("self_attn.q_proj", "self_attn.o_proj") and m[0] < 3),
                    key=lambda m: -importance[m])  # the 32 x 32 matrices
    ranks = [config.ranks.get(m, 0) for m in square]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] == 16 and ranks[-1] < 16, ranks


def test_a_budget_below_one_layer_is_a_clear_error(costs):
    with pytest.raises(BudgetError, match=r"phone: a memory budget of 0\.1 MB cannot hold one layer .* devices.memory_mb"):
        configure_device(costs, {}, 0.1 * MB, max_cut=5, batch=4, seq=32, device="phone")


def test_ranking_shift_is_kendalls_distance():
    before = {(0, "q"): 3.0, (0, "v"): 2.0, (1, "q"): 1.0}
    assert ranking_shift(before, before) == 0.0
    assert ranking_shift(before, {k: -v for k, v in before.items()}) == 1.0
    assert ranking_shift(before, {(0, "q"): 3.0, (0, "v"): 0.5, (1, "q"): 1.0}) == pytest.approx(1 / 3)

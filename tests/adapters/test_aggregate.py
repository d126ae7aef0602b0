"""Exact aggregation identities."""

from __future__ import annotations

import pytest
import torch

from splitfed.adapters.aggregate import weighted_average
from splitfed.adapters.lora import fit_rank


def test_weighted_average_is_exact_fedavg():
    a = {"x.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x.lora_B.weight": torch.tensor([[4.0]])}
    b = {"x.lora_A.weight": torch.tensor([[3.0, 6.0]]), "x.lora_B.weight": torch.tensor([[0.0]])}
    out = weighted_average([a, b], [1.0, 3.0])
    assert torch.equal(out["x.lora_A.weight"], torch.tensor([[2.5, 5.0]]))
    assert torch.equal(out["x.lora_B.weight"], torch.tensor([[1.0]]))


def test_layers_are_averaged_over_the_states_that_hold_them():
    shallow = {"l0": torch.tensor([2.0])}
    deep = {"l0": torch.tensor([4.0]), "l1": torch.tensor([8.0])}
    out = weighted_average([shallow, deep], [1.0, 1.0])
    assert torch.equal(out["l0"], torch.tensor([3.0])) and torch.equal(out["l1"], torch.tensor([8.0]))


def test_single_state_passes_through_bit_exact():
    state = {"k": torch.randn(3, 4)}
    assert torch.equal(weighted_average([state], [5.0])["k"], state["k"])


def test_heterogeneous_ranks_zero_pad_then_truncate():
    low = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(5, 2)}
    high = {"m.lora_A.weight": torch.full((4, 3), 3.0), "m.lora_B.weight": torch.full((5, 4), 3.0)}
    out = weighted_average([low, high], [1.0, 1.0])
    assert out["m.lora_A.weight"].shape == (4, 3)
    assert torch.equal(out["m.lora_A.weight"][:2], torch.full((2, 3), 2.0))
    assert torch.equal(out["m.lora_A.weight"][2:], torch.full((2, 3), 1.5))
    assert torch.equal(fit_rank(out["m.lora_B.weight"], torch.Size((5, 2))), torch.full((5, 2), 2.0))


def test_mismatched_weights_are_rejected():
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_average([{"k": torch.zeros(1)}], [1.0, 2.0])


def test_fedavg_refuses_mixed_ranks_and_names_the_key():
    from splitfed.adapters.aggregate import FedAvg, combine_states

    low = {"m.lora_A.weight": torch.ones(2, 3)}
    high = {"m.lora_A.weight": torch.ones(4, 3)}
    with pytest.raises(ValueError, match=r"'fedavg': 'm.lora_A.weight' arrives with shapes \[\(2, 3\), \(4, 3\)\].*zeropad"):
        combine_states(FedAvg(), [low, high], [1.0, 1.0])
    same = combine_states(FedAvg(), [low, {"m.lora_A.weight": torch.full((2, 3), 3.0)}], [1.0, 1.0])
    assert torch.equal(same["m.lora_A.weight"], torch.full((2, 3), 2.0))


def _module(rank: int, out: int = 6, inp: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, inp, generator=generator, dtype=torch.float64),
            "m.lora_B.weight": torch.randn(out, rank, generator=generator, dtype=torch.float64)}


def _product(state: dict[str, torch.Tensor], rank: int | None = None) -> torch.Tensor:
    a, b = state["m.lora_A.weight"], state["m.lora_B.weight"]
    if rank is not None:
        a, b = fit_rank(a, torch.Size((rank, a.shape[1]))), fit_rank(b, torch.Size((b.shape[0], rank)))
    return b @ a


def _mean_product(states, weights) -> torch.Tensor:
    return sum(w * _product(s) for s, w in zip(states, weights)) / sum(weights)


def test_averaging_factors_is_not_averaging_products():
    """fedavg on factors adds cross terms B_j A_k (j != k) that no participant trained."""
    from splitfed.adapters.aggregate import FedAvg, combine_states

    one, two = _module(2, seed=1), _module(2, seed=2)
    averaged = combine_states(FedAvg(), [one, two], [1.0, 1.0])
    cross = _product(averaged) - _mean_product([one, two], [1.0, 1.0])
    assert cross.abs().max() > 0.1  # = -(B1 - B2)(A1 - A2) / 4
    expected = -(one["m.lora_B.weight"] - two["m.lora_B.weight"]) @ (one["m.lora_A.weight"] - two["m.lora_A.weight"]) / 4
    torch.testing.assert_close(cross, expected)


@pytest.mark.parametrize("ranks", [(2, 4), (1, 2, 3), (4, 4, 8)])
def test_svd_is_the_average_of_products_when_the_rank_holds_it(ranks):
    """FlexLoRA: exact when the stored rank is at least the average's rank (here the sum of ranks fits in 8)."""
    from splitfed.adapters.aggregate import SVD, combine_states

    states = [_module(r, out=9, inp=10, seed=i) for i, r in enumerate(ranks)]
    weights = [1.0 + i for i in range(len(ranks))]
    combined = combine_states(SVD(), states, weights)
    assert combined["m.lora_A.weight"].shape == (max(ranks), 10)
    target = _mean_product(states, weights)
    assert torch.linalg.matrix_rank(target) > max(ranks)  # the largest rank cannot hold the average ...
    assert not torch.allclose(_product(combined), target)
    # ... a participant of rank sum(ranks) (here with zero factors and a negligible weight) can
    zero = {k: torch.zeros_like(v) for k, v in _module(sum(ranks), 9, 10).items()}
    lifted = combine_states(SVD(), [*states, zero], [*weights, 1e-300])
    assert lifted["m.lora_A.weight"].shape == (sum(ranks), 10)
    torch.testing.assert_close(_product(lifted), target, atol=1e-10, rtol=0)


def test_svd_truncation_is_the_best_approximation_at_each_rank():
    from splitfed.adapters.aggregate import SVD, combine_states

    states = [_module(4, seed=3), _module(4, seed=4)]
    combined = combine_states(SVD(), states, [2.0, 1.0])
    target = _mean_product(states, [2.0, 1.0])
    singular = torch.linalg.svdvals(target)
    for rank in (1, 2, 3, 4):
        error = torch.linalg.matrix_norm(_product(combined, rank) - target)
        torch.testing.assert_close(error, singular[rank:].square().sum().sqrt())  # Eckart-Young


@pytest.mark.parametrize("method", ["svd", "stack"])
def test_product_strategies_combine_a_layer_over_its_holders_only(method):
    """Module n is held by one participant of three: its combined product is that participant's alone;
    stack gives module m the weighted mean of its two holders' products exactly (svd's rank 4 cannot hold it)."""
    from splitfed.adapters.aggregate import STRATEGIES, combine_states

    shallow = _module(2, seed=5)
    deep = {**_module(4, seed=6), **{k.replace("m.", "n."): v for k, v in _module(3, seed=7).items()}}
    other = {k.replace("m.", "x."): v for k, v in _module(2, seed=8).items()}
    combined = combine_states(STRATEGIES[method](), [shallow, deep, other], [1.0, 3.0, 5.0])
    only = {k[2:]: v for k, v in combined.items() if k.startswith("n.")}
    torch.testing.assert_close(only["lora_B.weight"] @ only["lora_A.weight"], _product(_module(3, seed=7)))
    if method == "stack":
        m = {k: v for k, v in combined.items() if k.startswith("m.")}
        assert m["m.lora_A.weight"].shape[0] == 2 + 4
        torch.testing.assert_close(_product(m), _mean_product([shallow, _module(4, seed=6)], [1.0, 3.0]))


def test_config_with_mixed_ranks_needs_zeropad():
    from splitfed.config import ConfigError, parse_config

    tree = {"protocol": "memsfl", "devices": {"count": 2, "cuts": [1], "ranks": [2, 4]}}
    with pytest.raises(ConfigError, match=r"aggregation.method: 'fedavg' .* \[2, 4\]; allowed for mixed ranks: 'zeropad', 'svd'"):
        parse_config(tree)
    assert parse_config({**tree, "aggregation": {"method": "zeropad"}}).aggregation.method == "zeropad"


def test_exported_adapter_with_mixed_ranks_loads_in_peft(tiny_llama_dir, tmp_path):
    """Modules whose rank differs from the adapter's r are described by rank_pattern / alpha_pattern."""
    from peft import PeftModel

    from splitfed.adapters.layout import AdapterLayout
    from splitfed.adapters.lora import add_adapter, get_adapter_state, layout_config, save_peft_adapter
    from splitfed.models.families import family_for
    from splitfed.models.loading import load_model

    model = load_model(str(tiny_llama_dir))
    family = family_for(model.config)
    layout = AdapterLayout(range(0, 6), ("q_proj", "v_proj"), 4, 2.0)
    add_adapter(model, "x", layout_config(family, layout))
    state = get_adapter_state(model, "x")
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in state.items()}
    low = "model.layers.2.self_attn.q_proj"  # this module gets rank 2
    state[f"{low}.lora_A.weight"] = state[f"{low}.lora_A.weight"][:2]
    state[f"{low}.lora_B.weight"] = state[f"{low}.lora_B.weight"][:, :2]
    save_peft_adapter(state, layout_config(family, layout), tmp_path / "adapter", str(tiny_llama_dir))
    loaded = PeftModel.from_pretrained(load_model(str(tiny_llama_dir)), str(tmp_path / "adapter"))
    module = loaded.base_model.model.model.layers[2].self_attn.q_proj
    assert module.r["default"] == 2 and module.scaling["default"] == pytest.approx(2.0)
    assert torch.equal(module.lora_A["default"].weight, state[f"{low}.lora_A.weight"])
    assert loaded.peft_config["default"].task_type == "CAUSAL_LM"

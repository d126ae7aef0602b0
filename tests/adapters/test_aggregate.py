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

"""Importance scores of weight matrices (HSplitLoRA): the hook identity, the response to gradients, smoothing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splitfed.adapters.importance import FINE_TUNE_BYTES_PER_WEIGHT, ImportanceTracker, measure_scores


def test_score_equals_weights_dot_their_gradient_without_materialising_it():
    torch.manual_seed(0)
    layer, target = nn.Linear(6, 4), torch.randn(3, 5, 4)
    x = torch.randn(3, 5, 6)
    loss_of = lambda: ((layer(x) - target) ** 2).mean()  # noqa: E731
    scores = measure_scores({"w": layer}, lambda: loss_of().backward())
    layer.zero_grad()
    loss_of().backward()  # the quantity the hooks compute, from dL/dW itself
    direct = abs(float((layer.weight.detach() * layer.weight.grad).sum())) / (FINE_TUNE_BYTES_PER_WEIGHT * layer.weight.numel())
    assert scores["w"] == pytest.approx(direct, rel=1e-6)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def test_score_rises_with_the_matrix_output_gradient(tiny_llama_dir):
    """On the tiny Llama: scaling one matrix's output gradient by 3 triples its score."""
    from splitfed.models.loading import load_model

    model = load_model(str(tiny_llama_dir))
    model.model.embed_tokens.weight.requires_grad_(True)  # the base is frozen: give the loss a graph
    modules = {f"{i}.{name}": getattr(model.model.layers[i].self_attn, name) for i in (0, 3) for name in ("q_proj", "v_proj")}
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def backward() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    plain = measure_scores(modules, backward)
    assert all(score > 0 for score in plain.values())
    watched = modules["3.v_proj"]
    hook = watched.register_forward_hook(lambda module, inputs, output: _ScaleGradient.apply(output, 3.0))
    try:
        scaled = measure_scores(modules, backward)
    finally:
        hook.remove()
    assert scaled["3.v_proj"] == pytest.approx(3 * plain["3.v_proj"], rel=1e-4)
    assert scaled["3.q_proj"] == pytest.approx(plain["3.q_proj"], rel=1e-4)  # same layer, not downstream of it
    assert measure_scores(modules, backward) == pytest.approx(plain, rel=1e-6)  # the hooks are gone


def test_tracker_smooths_with_the_adaptive_factor():
    tracker = ImportanceTracker(total_rounds=4)
    assert tracker.update({"a": 2.0, "b": 1.0}, 1) == {"a": 2.0, "b": 1.0}
    after = tracker.update({"a": 4.0, "b": 0.5}, 2)
    keep_a = 1 - math.exp(-(4.0 * 2) / (2.0 * 4))
    keep_b = 1 - math.exp(-(0.5 * 2) / (1.0 * 4))
    assert after["a"] == pytest.approx(keep_a * 2.0 + (1 - keep_a) * 4.0)
    assert after["b"] == pytest.approx(keep_b * 1.0 + (1 - keep_b) * 0.5)
    with pytest.raises(ValueError, match="total_rounds"):
        ImportanceTracker(0)

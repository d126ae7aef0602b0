"""Importance of weight matrices for fine-tuning (HSplitLoRA): which matrices deserve LoRA, and how much rank.

The score of a weight matrix W is the first-order change of the loss when W is scaled,
divided by what fine-tuning it costs:

    score(W) = |sum_j w_j dL/dw_j| / C(W)

For an affine map y = W x + b, sum_j w_j dL/dw_j = sum over tokens of <dL/dy, y - b>, so a
forward hook on the module and a hook on its output's gradient give the score without ever
materialising dL/dW (``measure_scores``). C(W) is the memory full fine-tuning of W would need:
its gradient and two Adam moments in fp32, 12 bytes per weight. Scores are smoothed over rounds
(``ImportanceTracker``): I_t = g_t I_{t-1} + (1 - g_t) score_t, g_t = 1 - exp(-score_t t / (I_{t-1} T)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

FINE_TUNE_BYTES_PER_WEIGHT = 12
"""fp32 gradient + two Adam moments: C(W) = 12 bytes x numel(W)."""


def base_linear(module: nn.Module) -> nn.Module:
    """The frozen affine map of ``module`` (a PEFT LoRA layer's base layer, or the module itself)."""
    return getattr(module, "base_layer", module)


class ScoreMeter:
    """Accumulates each module's sum over tokens of <dL/dy, y - b> over the passes it watches.

    Only forward passes inside ``watching()`` are seen (their output gradients arrive later, in
    backward), so several roles sharing one base model can each measure their own passes."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.sums = {name: torch.zeros((), dtype=torch.float64) for name in modules}

    def _hook(self, name: str, affine: nn.Module) -> Callable:
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                if not torch.is_grad_enabled():
                    return  # evaluation: no backward will come
                output.requires_grad_(True)  # frozen layer on frozen inputs (layer 0): let dL/dy reach it anyway
            linear_part = output.detach() - (affine.bias.detach() if affine.bias is not None else 0)  # W x

            def gradient_hook(grad: torch.Tensor) -> None:  # grad: dL/dy, (batch, seq, out)
                wide = torch.float32 if grad.device.type == "mps" else torch.float64  # MPS has no float64
                self.sums[name] += (grad.to(wide) * linear_part.to(wide)).sum().to("cpu", torch.float64)

            output.register_hook(gradient_hook)

        return forward_hook

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Watch the forward passes run inside the block."""
        # prepend: see the module's own output, before any other hook replaces it
        handles = [base_linear(m).register_forward_hook(self._hook(n, base_linear(m)), prepend=True)
                   for n, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def scores(self) -> dict[str, float]:
        """|sum| / C(W) per module over everything watched so far."""
        return {name: abs(float(total)) / (FINE_TUNE_BYTES_PER_WEIGHT * base_linear(self.modules[name]).weight.numel())
                for name, total in self.sums.items()}


def measure_scores(modules: Mapping[str, nn.Module], run_backward: Callable[[], None]) -> dict[str, float]:
    """Each module's score |sum over tokens of <dL/dy, y - b>| / C(W) over what ``run_backward`` computes.

    ``run_backward`` runs the forward passes and ``loss.backward()`` of a few batches."""
    meter = ScoreMeter(modules)
    with meter.watching():
        run_backward()
    return meter.scores()


class ImportanceTracker:
    """Importance smoothed over rounds with HSplitLoRA's adaptive factor."""

    def __init__(self, total_rounds: int) -> None:
        if total_rounds < 1:
            raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
        self.total_rounds = total_rounds
        self.importance: dict[str, float] = {}

    def update(self, scores: Mapping[str, float], round_number: int) -> dict[str, float]:
        """Fold round ``round_number``'s (1-based) scores in; returns the importance of every matrix seen so far."""
        for name, score in scores.items():
            previous = self.importance.get(name)
            if previous is None or previous <= 0:
                self.importance[name] = score
                continue
            keep = 1.0 - math.exp(-(score * round_number) / (previous * self.total_rounds))
            self.importance[name] = keep * previous + (1.0 - keep) * score
        return dict(self.importance)

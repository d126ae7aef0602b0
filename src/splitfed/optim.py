"""Optimizers and learning-rate schedules shared by every role."""

from __future__ import annotations

import math

import torch

from splitfed.config import TrainSection


def make_optimizer(params: list[torch.nn.Parameter], train: TrainSection) -> torch.optim.Optimizer:
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)


def lr_at(step: int, total_steps: int, train: TrainSection) -> float:
    """Learning rate at local step ``step`` (0-based) of ``total_steps``: warmup, then the schedule."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    if train.schedule == "linear":
        return train.lr * (1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def grad_sq_norm(params: list[torch.nn.Parameter]) -> float:
    """Sum of squared gradient entries (the square of the L2 norm clipping uses)."""
    return float(sum(torch.linalg.vector_norm(p.grad) ** 2 for p in params if p.grad is not None))


def clip_scale(total_sq_norm: float, max_norm: float | None) -> float:
    """Factor that brings the joint gradient norm down to ``max_norm`` (torch's clip rule)."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(total_sq_norm) + 1e-6))


def apply_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], scale: float, lr: float) -> None:
    """Scale the gradients, take one optimizer step at ``lr`` and clear the gradients."""
    if scale != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

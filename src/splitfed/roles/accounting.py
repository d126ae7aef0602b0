"""Measured memory of a role: the tensors it holds plus the activations it saves for backward.

In one process many roles share tensors, so process RSS cannot tell a device's memory
from the server's. Instead each role counts the unique storages it owns (base weights of
its stages, adapters, optimizer state) and, during its forward passes, the bytes autograd
saves for backward (parameters excluded). Peak = held bytes + largest saved-activation set.
On a CUDA device the forward pass is measured by the allocator instead: the peak allocated
during the pass above what was allocated when it began (saved activations plus workspace).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared/tied weights count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def optimizer_tensors(state: Mapping) -> list[torch.Tensor]:
    """The tensors of an optimizer's per-parameter state (``optimizer.state``, or a state_dict's ``"state"``)."""
    return [v for entry in state.values() for v in entry.values() if isinstance(v, torch.Tensor)]


_CUDA_PEAKS: dict[torch.device, int] = {}


def cuda_peak_bytes(device: torch.device | None = None) -> int:
    """The most this process has had allocated on a CUDA device since it started (the meters reset the
    allocator's peak statistics for each pass; this folds the peaks before each reset back in)."""
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    return max(_CUDA_PEAKS.get(device, 0), torch.cuda.max_memory_allocated(device))


class ActivationMeter:
    """Bytes autograd saves for backward during metered forward passes.

    ``measure`` sets ``last`` to the bytes saved by one forward pass (storages are deduplicated
    within the pass, while its graph keeps them alive); ``record`` keeps the largest total of
    passes whose graphs coexist (e.g. parallel server copies).
    """

    def __init__(self) -> None:
        self.peak = 0
        self.last = 0

    def record(self, total: int) -> None:
        self.peak = max(self.peak, total)

    @contextmanager
    def measure(self, exclude: Iterable[torch.Tensor] = (), device: torch.device | None = None) -> Iterator[None]:
        """Meter one forward pass that runs on ``device`` (CPU by default) into ``last``."""
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
            _CUDA_PEAKS[device] = cuda_peak_bytes(device)  # keep the process's peak across the reset
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            yield
            torch.cuda.synchronize(device)
            self.last = torch.cuda.max_memory_allocated(device) - start
            return
        skip = {t.untyped_storage().data_ptr() for t in exclude if t.device.type != "meta"}
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self.last = sum(seen.values())

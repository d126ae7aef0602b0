"""A pool of named LoRA adapters on a base model, lent to the slots whose turn it is.

A slot that is not training keeps its adapter factors and optimizer state as plain tensors
(``roles.worker.Slot``); only the slots that train at the same time occupy a PEFT adapter of the
model. Injecting an adapter walks the model's modules, and every adapter already injected makes
the next walk longer, so one adapter per device made building a run quadratic in the devices.
A pool sized to what runs at once keeps building linear: a thousand devices of which ten train
per round cost one base model, about ten adapters, and a thousand sets of small tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.lora import adapter_parameters, add_adapter, layout_config, lora_layers, unfreeze
from splitfed.models.families import Family


@dataclass(eq=False)
class PooledAdapter:
    """One named adapter of the model and who holds it now."""

    name: str
    params: dict[str, nn.Parameter]
    """Canonical key (adapter name removed) -> trainable tensor."""
    holder: object | None = None
    last_lent: int = 0


@dataclass(eq=False)
class AdapterPool:
    """Adapters per (model, layout). ``reuse=False`` never takes an adapter from its holder: one
    adapter per slot, for good (the design before pools; memory grows with the slots)."""

    family: Family
    dropout: float = 0.0
    reuse: bool = True
    _adapters: dict[tuple[int, AdapterLayout], list[PooledAdapter]] = field(default_factory=dict)
    _names: dict[int, itertools.count] = field(default_factory=dict)
    _clock: itertools.count = field(default_factory=itertools.count)

    def lend(self, model: nn.Module, layout: AdapterLayout, holder: object,
             idle: Callable[[object], bool]) -> tuple[PooledAdapter, object | None]:
        """An adapter of ``layout`` on ``model`` for ``holder``: a free one; else (``reuse``) the one whose
        holder is idle and has held it longest without a turn, returned second so that the caller saves
        that holder's state before overwriting it; else a new one."""
        adapters = self._adapters.setdefault((id(model), layout), [])
        free = [a for a in adapters if a.holder is None]
        taken = sorted((a for a in adapters if a.holder is not None and self.reuse and idle(a.holder)),
                       key=lambda a: a.last_lent)
        chosen = free[0] if free else taken[0] if taken else self._inject(model, layout)
        previous, chosen.holder, chosen.last_lent = chosen.holder, holder, next(self._clock)
        if chosen not in adapters:
            adapters.append(chosen)
        return chosen, previous

    def touch(self, adapter: PooledAdapter) -> None:
        """``adapter``'s holder takes a turn: it is the last to be taken from it."""
        adapter.last_lent = next(self._clock)

    def shapes(self, model: nn.Module, layout: AdapterLayout) -> dict[str, tuple[int, ...]]:
        """The tensor shapes of an adapter of ``layout`` on ``model`` (by canonical key), lending nothing."""
        adapters = self._adapters.setdefault((id(model), layout), [])
        if not adapters:
            adapters.append(self._inject(model, layout))
        return {k: tuple(p.shape) for k, p in adapters[0].params.items()}

    @staticmethod
    def give_back(adapter: PooledAdapter, holder: object) -> None:
        """``holder`` is done with ``adapter`` (a no-op when the pool has already lent it to another)."""
        if adapter.holder is holder:
            adapter.holder = None

    def size(self) -> int:
        """Adapters injected so far, over all models and layouts."""
        return sum(len(a) for a in self._adapters.values())

    def _inject(self, model: nn.Module, layout: AdapterLayout) -> PooledAdapter:
        name = f"slot{next(self._names.setdefault(id(model), itertools.count()))}"
        with torch.random.fork_rng(devices=[]):  # PEFT's initial values are overwritten; the run's RNG is not touched
            add_adapter(model, name, layout_config(self.family, layout, self.dropout))
        unfreeze(lora_layers(model))  # adapters with a forward in flight must keep their gradients
        return PooledAdapter(name, adapter_parameters(model, name))

"""The stage worker: one role for any stage of a route (first, middle or last).

A worker owns stages of one base model and, per *slot*, a named LoRA adapter with its
optimizer. A first-stage slot also owns its data (a batch stream); a last-stage slot computes
the loss. Device, server, edge and cloud are stage workers in different places. A worker
reacts to messages and returns messages; it holds no transport code.

One split step of a group of routes, seen from the workers:
  first     ``forward``        -> activations (hidden, attention mask, labels)
  middle    ``forward_group``  -> activations for the next stage (per route)
  last      ``forward_group``  -> loss, backward, activation gradients (per route)
  middle    ``backward_group`` -> activation gradients for the previous stage (per route)
  first     ``backward``       -> its squared grad norm
  all       ``apply``          -> step with the clipping factor over the whole route
The last stage's gradients are those of the group's token-mean loss; each route's gradient
carries ``grad_scale`` = group tokens / route tokens, which the first stage applies, so a
device's update is that of its own mean loss (it does not shrink with the group's size).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from splitfed.adapters.importance import ScoreMeter
from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.lora import activate, fit_state, load_factors, lora_layers, target_modules
from splitfed.adapters.pool import AdapterPool, PooledAdapter
from splitfed.adapters.merge import apply_merges
from splitfed.config import TrainSection
from splitfed.data.batches import BatchStream, TokenDataset
from splitfed.models.split import Stage, position_ids_for, token_loss_sum
from splitfed.optim import apply_step, clip_scale, grad_sq_norm, make_optimizer
from splitfed.roles.accounting import ActivationMeter, module_tensors, optimizer_tensors, unique_bytes
from splitfed.wire.messages import Message
from splitfed.wire.state import flatten, unflatten

Arrivals = list[tuple[int, Message]]
"""(route, message) pairs for one slot, in the order the protocol serves them."""


def base_tensors(stage: Stage) -> list[torch.Tensor]:
    """The frozen base weights a stage needs (adapters excluded)."""
    return [
        t
        for module in stage.owned_modules()
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if ".lora_" not in f".{name}"
    ]


@dataclass
class _Pending:
    """What a middle or first stage keeps between forward and backward."""

    routes: list[int]
    sizes: list[int]
    inputs: torch.Tensor | None
    """(batch, seq, hidden) input that requires grad (None on a first stage)."""
    outputs: torch.Tensor
    """(batch, seq, hidden) output whose gradient comes back."""


@dataclass(eq=False)
class Slot:
    """One adapter a worker trains (a device's, or a server-side one), and its data on a first stage.

    Between its turns a slot is plain tensors (``saved``: its LoRA factors and optimizer state); for a
    turn it borrows an adapter of the model from the worker's ``AdapterPool`` (``bind``), and gives it
    back with its state saved when another slot needs it (``park``). A slot that has never trained
    holds nothing: its first download gives it its values, its first step its optimizer state."""

    name: str
    stage: Stage
    layout: AdapterLayout
    pool: AdapterPool
    train: TrainSection
    stream: BatchStream | None = None
    num_samples: int = 0
    sq_norm: float = 0.0
    pending: _Pending | None = None
    meter: ScoreMeter | None = None
    """Importance of the slot's weight matrices over the passes it watches (HSplitLoRA)."""
    watch_left: int = 0
    """Forward passes the meter still watches."""
    adapter: PooledAdapter | None = None
    """The model's adapter this slot trains on now (None: parked)."""
    optimizer: torch.optim.Optimizer | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lora_layers: list = field(default_factory=list)
    held_tensors: list[torch.Tensor] = field(default_factory=list)
    """Every tensor of the slot's modules (excluded from the saved-activation count)."""
    saved: tuple[dict[str, torch.Tensor], dict | None] | None = None
    """Parked: (LoRA factors by canonical key, optimizer state_dict or None before the first step)."""

    def idle(self) -> bool:
        """Nothing of a step in flight: no forward waiting for its backward, no gradient waiting for its step."""
        return self.pending is None and all(p.grad is None for p in self.params)

    def bind(self) -> Slot:
        """Make sure this slot trains on an adapter of the model, its saved state loaded into it."""
        if self.adapter is not None:
            self.pool.touch(self.adapter)
            return self
        adapter, previous = self.pool.lend(self.stage.model, self.layout, self, Slot.idle)
        if previous is not None:
            previous.park()
        self.adapter = adapter
        self.params = list(adapter.params.values())
        self.lora_layers = lora_layers(*self.stage.owned_modules())
        self.held_tensors = module_tensors(self.stage.owned_modules())
        self.optimizer = make_optimizer(self.params, self.train)
        factors, optimizer_state = self.saved if self.saved is not None else (None, None)
        with torch.no_grad():
            for key, param in adapter.params.items():
                if factors is None:
                    param.zero_()  # no values yet: its first download brings them
                else:
                    param.copy_(factors[key])
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.saved = None
        return self

    def park(self) -> None:
        """Save the adapter's factors and optimizer state as tensors of this slot and give the adapter back."""
        if self.adapter is None:
            return
        self.saved = (self.factors(), self.optimizer_state())
        self.release()

    def release(self) -> None:
        """Give the adapter back without saving (its state is replaced or no longer needed)."""
        if self.adapter is not None:
            self.pool.give_back(self.adapter, self)
        self.adapter, self.optimizer, self.params, self.lora_layers, self.held_tensors = None, None, [], [], []

    def factors(self) -> dict[str, torch.Tensor]:
        """The LoRA factors by canonical key (copies), bound or parked; empty before any values."""
        if self.adapter is not None:
            return {k: p.detach().clone() for k, p in self.adapter.params.items()}
        return dict(self.saved[0]) if self.saved is not None else {}

    def optimizer_state(self) -> dict | None:
        """The optimizer's state_dict, bound or parked; None before the slot's first step."""
        if self.adapter is not None:
            return self.optimizer.state_dict() if self.optimizer.state else None
        return self.saved[1] if self.saved is not None else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of this slot's LoRA tensors (by canonical key)."""
        return self.pool.shapes(self.stage.model, self.layout)

    def state_tensors(self) -> list[torch.Tensor]:
        """What this slot holds of its own: LoRA factors and optimizer state."""
        if self.adapter is not None:
            return [*self.params, *optimizer_tensors(self.optimizer.state)]
        factors, optimizer_state = self.saved or ({}, None)
        return [*factors.values(), *optimizer_tensors((optimizer_state or {}).get("state", {}))]

    def discard_pending(self) -> None:
        """Drop what an unfinished step left: gradients whose optimizer step never came, a forward's graph."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.pending = None


class StageWorker:
    def __init__(self, name: str, train: TrainSection, pool: AdapterPool) -> None:
        self.name = name
        self.train = train
        self.pool = pool
        self.slots: dict[str, Slot] = {}
        self.meter = ActivationMeter()

    def add_slot(self, name: str, stage: Stage, layout: AdapterLayout, data: TokenDataset | None = None,
                 seed: int | None = None) -> Slot:
        """Train an adapter of ``layout`` on ``stage``'s model in slot ``name``; a first stage reads ``data``.
        Nothing is allocated until the slot's first turn."""
        slot = Slot(name, stage, layout, self.pool, self.train)
        if data is not None:
            slot.stream = BatchStream(data, self.train.batch_size, seed if seed is not None else 0)
            slot.num_samples = len(data)
        self.slots[name] = slot
        return slot

    def relayout(self, slot_name: str | None, layout: AdapterLayout) -> None:
        """Give the slot an adapter of another layout (placement, ranks), with a fresh optimizer;
        its values come with the next download."""
        slot = self.slot(slot_name)
        slot.discard_pending()
        slot.release()
        slot.layout, slot.saved = layout, None

    def slot(self, name: str | None) -> Slot:
        if name is None and len(self.slots) == 1:
            return next(iter(self.slots.values()))
        if name not in self.slots:
            raise KeyError(f"{self.name}: no slot {name!r}; it has {sorted(self.slots)}")
        return self.slots[name]

    # --- first stage --------------------------------------------------------------------
    def forward(self, slot_name: str | None, round_index: int, step: int) -> Message:
        """Run the first stage on the slot's next batch; the activations go up the route."""
        slot = self.slot(slot_name).bind()
        slot.discard_pending()
        activate(slot.lora_layers, [slot.adapter.name])
        batch = slot.stream.next_batch()
        with self.meter.measure(slot.held_tensors, slot.stage.device), self._watch(slot):
            hidden = slot.stage(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
        self.meter.record(self.meter.last)
        slot.pending = _Pending([], [hidden.shape[0]], None, hidden)  # (batch, seq, hidden)
        tensors = {"hidden": hidden, "attention_mask": batch.attention_mask, "labels": batch.labels}
        return Message("activations", self.name, round_index, step, tensors)

    def backward(self, slot_name: str | None, message: Message) -> Message:
        """Backpropagate the activation gradient (times its ``grad_scale``); report the squared grad norm."""
        slot = self.slot(slot_name).bind()
        if slot.pending is None:
            raise RuntimeError(f"{self.name}: activation gradient without a pending forward pass")
        outputs = slot.pending.outputs
        grad = message.tensors["grad"].to(outputs.device, outputs.dtype)
        scale = float(message.values["grad_scale"])
        outputs.backward(grad * scale if scale != 1.0 else grad)
        slot.pending = None
        slot.sq_norm = grad_sq_norm(slot.params)
        return Message("grad_norm", self.name, message.round, message.step, values={"sq_norm": slot.sq_norm})

    # --- middle and last stages ---------------------------------------------------------
    def forward_group(self, groups: dict[str, Arrivals]) -> dict[int, Message]:
        """Forward the arrivals of each slot as one concatenated batch (slots of one call run in
        parallel: their saved activations coexist). A last stage also computes the loss and
        backward and returns activation gradients; a middle stage returns its activations."""
        replies: dict[int, Message] = {}
        saved = 0
        for slot_name, arrivals in groups.items():
            slot = self.slot(slot_name).bind()
            slot.discard_pending()
            replies.update(self._forward_slot(slot, arrivals))
            saved += self.meter.last
        self.meter.record(saved)
        return replies

    def _forward_slot(self, slot: Slot, arrivals: Arrivals) -> dict[int, Message]:
        activate(slot.lora_layers, [slot.adapter.name])
        messages = [m for _, m in arrivals]
        stage = slot.stage
        hidden = torch.cat([m.tensors["hidden"] for m in messages]).to(stage.device, stage.dtype)  # (batch, seq, hidden)
        hidden.requires_grad_(True)
        mask = torch.cat([m.tensors["attention_mask"] for m in messages])
        labels = torch.cat([m.tensors["labels"] for m in messages])
        sizes = [m.tensors["hidden"].shape[0] for m in messages]
        routes = [r for r, _ in arrivals]
        watch = self._watch(slot)
        if not slot.stage.spec.last:
            with self.meter.measure(slot.held_tensors, slot.stage.device), watch:
                out = slot.stage(hidden, mask, position_ids_for(mask))
            slot.pending = _Pending(routes, sizes, hidden, out)
            return {
                r: Message("activations", self.name, m.round, m.step,
                           {"hidden": h, "attention_mask": m.tensors["attention_mask"], "labels": m.tensors["labels"]})
                for r, m, h in zip(routes, messages, out.split(sizes))
            }
        with self.meter.measure(slot.held_tensors, slot.stage.device), watch:  # the loss's log-softmax is saved too
            logits = slot.stage(hidden, mask, position_ids_for(mask))
            sums, counts = zip(*(token_loss_sum(lg, lb) for lg, lb in zip(logits.split(sizes), labels.split(sizes))))
        total_tokens = max(sum(counts), 1)
        (sum(sums) / total_tokens).backward()
        slot.sq_norm = grad_sq_norm(slot.params)
        replies = {}
        for route, message, grad, loss_sum, count in zip(routes, messages, hidden.grad.split(sizes), sums, counts):
            values = {"loss": loss_sum.item() / max(count, 1), "tokens": count,
                      "grad_scale": total_tokens / count if count else 1.0}
            replies[route] = Message("activation_grad", self.name, message.round, message.step, {"grad": grad}, values)
        return replies

    def backward_group(self, groups: dict[str, Arrivals]) -> dict[int, Message]:
        """Backpropagate the gradients of a middle stage's outputs; return its inputs' gradients."""
        replies: dict[int, Message] = {}
        for slot_name, arrivals in groups.items():
            slot = self.slot(slot_name).bind()
            pending = slot.pending
            if pending is None:
                raise RuntimeError(f"{self.name}: activation gradient without a pending forward pass")
            by_route = dict(arrivals)
            kept = [i for i, r in enumerate(pending.routes) if r in by_route]
            grads = [by_route[r].tensors["grad"].to(o.device, o.dtype) if r in by_route else torch.zeros_like(o)
                     for r, o in zip(pending.routes, pending.outputs.split(pending.sizes))]
            pending.outputs.backward(torch.cat(grads))
            slot.sq_norm = grad_sq_norm(slot.params)
            slot.pending = None
            input_grads = pending.inputs.grad.split(pending.sizes)
            for i in kept:
                route = pending.routes[i]
                incoming = by_route[route]
                replies[route] = Message("activation_grad", self.name, incoming.round, incoming.step,
                                         {"grad": input_grads[i]}, dict(incoming.values))
        return replies

    # --- every stage --------------------------------------------------------------------
    def sq_norm(self, slot_name: str | None) -> float:
        """Squared grad norm of the slot's LoRA after its last backward."""
        return self.slot(slot_name).sq_norm

    def apply(self, slot_name: str | None, scale: float, lr: float) -> None:
        """Take the optimizer step with the clipping factor decided over the whole route."""
        slot = self.slot(slot_name).bind()
        apply_step(slot.optimizer, slot.params, scale, lr)
        slot.pending = None

    def discard(self, slot_name: str | None) -> None:
        """A slot whose routes all dropped out of the step does not step; its gradients are discarded."""
        self.slot(slot_name).discard_pending()

    def local_step(self, slot_name: str | None, lr: float) -> tuple[float, int]:
        """One whole-model forward/backward/step (a slot that is first and last); returns (mean loss, tokens)."""
        slot = self.slot(slot_name).bind()
        activate(slot.lora_layers, [slot.adapter.name])
        batch = slot.stream.next_batch()
        with self.meter.measure(slot.held_tensors, slot.stage.device), self._watch(slot):
            logits = slot.stage(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
            loss_sum, tokens = token_loss_sum(logits, batch.labels)
        self.meter.record(self.meter.last)
        loss = loss_sum / max(tokens, 1)
        loss.backward()
        scale = clip_scale(grad_sq_norm(slot.params), self.train.max_grad_norm)
        apply_step(slot.optimizer, slot.params, scale, lr)
        return loss.item(), tokens

    # --- importance (HSplitLoRA) -------------------------------------------------------------
    def measure_importance(self, slot_name: str | None, targets: list[str], passes: int) -> None:
        """Score the ``targets`` matrices of the slot's layers (``adapters.importance``) over its next ``passes`` forward passes."""
        slot = self.slot(slot_name)
        spec = slot.stage.spec
        modules = target_modules(slot.stage.model, slot.stage.family, range(spec.start, spec.end), targets)
        slot.meter, slot.watch_left = ScoreMeter(modules), passes

    def _watch(self, slot: Slot) -> AbstractContextManager:
        if slot.meter is None or slot.watch_left <= 0:
            return nullcontext()
        slot.watch_left -= 1
        return slot.meter.watching()

    def importance(self, slot_name: str | None, round_index: int) -> Message:
        """The scores measured since ``measure_importance``, one float64 per matrix named by its path; the meter stops."""
        slot = self.slot(slot_name)
        scores = slot.meter.scores() if slot.meter is not None else {}
        slot.meter, slot.watch_left = None, 0
        tensors = {path: torch.tensor([score], dtype=torch.float64) for path, score in scores.items()}
        return Message("importance", self.name, round_index, 0, tensors)

    # --- federation ---------------------------------------------------------------------
    def upload(self, slot_name: str | None, round_index: int) -> Message:
        slot = self.slot(slot_name)
        state = slot.factors()
        weight = {"num_samples": slot.num_samples} if slot.stream is not None else {}  # a first stage's sample weight
        return Message("adapter_upload", self.name, round_index, 0, state, weight)

    def download(self, slot_name: str | None, message: Message) -> None:
        slot = self.slot(slot_name)
        label = f"{self.name}/{slot.name}"
        if slot.adapter is not None:
            load_factors(slot.adapter.params, message.tensors, label=label)
        else:  # a parked slot keeps its values as tensors until its turn
            factors = {k: t.clone() for k, t in fit_state(message.tensors, slot.shapes(), label=label).items()}
            slot.saved = (factors, slot.saved[1] if slot.saved is not None else None)

    def merge(self, slot_name: str | None, message: Message) -> None:
        """Add the merges the message brings (``adapters.merge``) to the base weights of the slot's layers.
        The slot's adapter restarts with the download that follows, so its optimizer restarts now: moments
        of the old factors mean nothing for the new ones."""
        slot = self.slot(slot_name)
        spec = slot.stage.spec
        apply_merges(slot.stage.model, message.tensors, slot.stage.family, range(spec.start, spec.end),
                     int(message.values["since"]), int(message.values["version"]))
        if slot.adapter is not None:
            slot.optimizer = make_optimizer(slot.params, self.train)
        elif slot.saved is not None:
            slot.saved = (slot.saved[0], None)

    # --- checkpoints --------------------------------------------------------------------
    def export_state(self, slots: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Every slot's (or ``slots``') adapter, optimizer and batch-stream position as (tensors, JSON-able meta).
        A slot that holds no values yet exports only its stream position."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {}
        for name, slot in self.slots.items():
            if slots is not None and name not in slots:
                continue
            prefix = f"{name}/"
            tensors.update({f"{prefix}adapter/{k}": v for k, v in slot.factors().items()})
            entry = {}
            optimizer_state = slot.optimizer_state()
            if optimizer_state is not None:
                entry["optimizer"] = flatten(f"{prefix}optimizer", optimizer_state, tensors)
            if slot.stream is not None:
                entry["stream"] = flatten(f"{prefix}stream", slot.stream.state_dict(), tensors)
            meta[name] = entry
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for name, entry in meta.items():
            slot = self.slot(name)
            slot.discard_pending()
            slot.release()
            prefix = f"{name}/adapter/"
            factors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            optimizer_state = unflatten(entry["optimizer"], tensors) if "optimizer" in entry else None
            slot.saved = (factors, optimizer_state) if factors else None
            if slot.stream is not None and "stream" in entry:
                slot.stream.load_state_dict(unflatten(entry["stream"], tensors))

    # --- accounting ---------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Base weights of the slots' stages + their adapters + optimizer state (shared storages once).
        Slots on the same layers of the same model share their base tensors: each span is walked once
        (a server with a slot per device would otherwise walk its layers once per device)."""
        stages = {(id(s.stage.model), s.stage.spec): s.stage for s in self.slots.values()}
        tensors = [t for stage in stages.values() for t in base_tensors(stage)]
        tensors += [t for s in self.slots.values() for t in s.state_tensors()]
        return unique_bytes(tensors)

    def peak_bytes(self) -> int:
        return self.held_bytes() + self.meter.peak

    @property
    def trainable_params(self) -> int:
        """LoRA parameters the slots train (from their layouts: a slot that has not trained yet counts too)."""
        return sum(math.prod(shape) for s in self.slots.values() for shape in s.shapes().values())

"""The device role: runs its stage (embeddings + first layers) with its own LoRA on its own data.

A device reacts to messages and returns messages; it holds no transport code. With a
whole-model stage (federated LoRA, centralized) it computes the loss itself.
"""

from __future__ import annotations

import torch

from splitfed.adapters.lora import (
    AdapterState,
    activate,
    adapter_parameters,
    get_adapter_state,
    lora_layers,
    set_adapter_state,
)
from splitfed.config import TrainSection
from splitfed.data.batches import BatchStream, TokenDataset
from splitfed.models.split import Stage, position_ids_for, token_loss_sum
from splitfed.optim import apply_step, clip_scale, grad_sq_norm, make_optimizer
from splitfed.roles.accounting import ActivationMeter, module_tensors, optimizer_tensors, unique_bytes
from splitfed.wire.messages import Message
from splitfed.wire.state import flatten, unflatten


def base_tensors(stage: Stage) -> list[torch.Tensor]:
    """The frozen base weights a stage needs (adapters excluded)."""
    return [
        t
        for module in stage.owned_modules()
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if ".lora_" not in f".{name}"
    ]


def export_trainable(model: torch.nn.Module, adapter: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """A role's adapter and optimizer state as (tensors, JSON-able meta)."""
    tensors = {f"adapter/{k}": v for k, v in get_adapter_state(model, adapter).items()}
    return tensors, {"optimizer": flatten("optimizer", optimizer.state_dict(), tensors)}


def import_trainable(
    model: torch.nn.Module, adapter: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict
) -> None:
    state = {k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")}
    set_adapter_state(model, adapter, state)
    optimizer.load_state_dict(unflatten(meta["optimizer"], tensors))


class Device:
    def __init__(
        self, device_id: int, stage: Stage, adapter: str, data: TokenDataset, train: TrainSection, seed: int
    ) -> None:
        self.id = device_id
        self.name = f"device{device_id}"
        self.stage = stage
        self.adapter = adapter
        self.train = train
        self.num_samples = len(data)
        self.stream = BatchStream(data, train.batch_size, seed)
        self._lora_layers = [m for owned in stage.owned_modules() for m in lora_layers(owned)]
        self.params = list(adapter_parameters(stage.model, adapter).values())
        self.optimizer = make_optimizer(self.params, train)
        self.meter = ActivationMeter()
        self._module_tensors = module_tensors(stage.owned_modules())  # excluded from saved activations
        self._hidden: torch.Tensor | None = None
        self.last_loss = float("nan")  # mean loss of the last split step, as the server reported it
        self.last_tokens = 0

    # --- split training -------------------------------------------------------------
    def forward(self, round_index: int, step: int) -> Message:
        """Run the device stage on the next batch; the activations go to the server."""
        self._discard_pending()
        activate(self._lora_layers, [self.adapter])
        batch = self.stream.next_batch()
        positions = position_ids_for(batch.attention_mask)
        with self.meter.measure(exclude=self._module_tensors):
            hidden = self.stage(batch.input_ids, batch.attention_mask, positions)  # (batch, seq, hidden)
        self.meter.record(self.meter.last)
        self._hidden = hidden
        tensors = {"hidden": hidden, "attention_mask": batch.attention_mask, "labels": batch.labels}
        return Message("activations", self.name, round_index, step, tensors)

    def backward(self, message: Message) -> Message:
        """Backpropagate the server's activation gradient; report the squared grad norm."""
        if self._hidden is None:
            raise RuntimeError(f"{self.name}: activation gradient without a pending forward pass")
        self._hidden.backward(message.tensors["grad"])
        self._hidden = None
        self.last_loss = float(message.values["loss"])
        self.last_tokens = int(message.values["tokens"])
        return Message("grad_norm", self.name, message.round, message.step, values={"sq_norm": grad_sq_norm(self.params)})

    def apply(self, message: Message, lr: float) -> None:
        """Take the optimizer step with the clipping factor the server decided."""
        apply_step(self.optimizer, self.params, float(message.values["scale"]), lr)

    # --- whole-model training (federated LoRA, centralized) ------------------------------
    def local_step(self, lr: float) -> tuple[float, int]:
        """One full forward/backward/step on the device; returns (mean loss, tokens)."""
        activate(self._lora_layers, [self.adapter])
        batch = self.stream.next_batch()
        positions = position_ids_for(batch.attention_mask)
        with self.meter.measure(exclude=self._module_tensors):
            logits = self.stage(batch.input_ids, batch.attention_mask, positions)
            loss_sum, tokens = token_loss_sum(logits, batch.labels)
        self.meter.record(self.meter.last)
        loss = loss_sum / max(tokens, 1)
        loss.backward()
        scale = clip_scale(grad_sq_norm(self.params), self.train.max_grad_norm)
        apply_step(self.optimizer, self.params, scale, lr)
        return loss.item(), tokens

    # --- federation ---------------------------------------------------------------------
    def upload(self, round_index: int) -> Message:
        state = get_adapter_state(self.stage.model, self.adapter)
        return Message("adapter_upload", self.name, round_index, 0, state, {"num_samples": self.num_samples})

    def download(self, message: Message) -> None:
        set_adapter_state(self.stage.model, self.adapter, message.tensors)

    @property
    def layers(self) -> range:
        """Decoder layers this device trains (its adapter's slice of the global LoRA)."""
        return self.stage.spec.layers

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Adapter, optimizer and batch-stream position as (tensors, JSON-able meta): a checkpoint."""
        tensors, meta = export_trainable(self.stage.model, self.adapter, self.optimizer)
        meta["stream"] = flatten("stream", self.stream.state_dict(), tensors)
        return tensors, meta

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._discard_pending()
        import_trainable(self.stage.model, self.adapter, self.optimizer, tensors, meta)
        self.stream.load_state_dict(unflatten(meta["stream"], tensors))

    def _discard_pending(self) -> None:
        """Drop what a step left behind if it never finished: gradients of a backward whose
        optimizer step never came (the server died or dropped us) and a forward's graph."""
        self.optimizer.zero_grad(set_to_none=True)
        self._hidden = None

    # --- accounting ---------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Base weights of the stage + this device's adapter + its optimizer state."""
        return unique_bytes([*base_tensors(self.stage), *self.params, *optimizer_tensors(self.optimizer)])

    def peak_bytes(self) -> int:
        return self.held_bytes() + self.meter.peak

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

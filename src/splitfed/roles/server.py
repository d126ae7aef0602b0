"""The server role: runs the layers above each device's cut, computes the loss, returns gradients.

The server holds *slots*: a stage (layers [cut, L) + head) with a named LoRA adapter and
its optimizer. Protocols differ only in how devices map to slots: one shared slot (sfl),
one slot per device on the same base model (memsfl), or one slot per device on its own
copy of the server-side model (sflv1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitfed.adapters.lora import activate, adapter_parameters, lora_layers
from splitfed.config import TrainSection
from splitfed.models.split import Stage, position_ids_for, token_loss_sum
from splitfed.optim import apply_step, clip_scale, grad_sq_norm, make_optimizer
from splitfed.roles.accounting import ActivationMeter, module_tensors, optimizer_tensors, unique_bytes
from splitfed.roles.device import base_tensors, export_trainable, import_trainable
from splitfed.wire.messages import Message


@dataclass
class ServerSlot:
    stage: Stage
    adapter: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lora_layers: list = field(default_factory=list)
    held_tensors: list[torch.Tensor] = field(default_factory=list)
    """Every tensor of the slot's modules (excluded from the saved-activation count)."""
    server_sq_norm: float = 0.0

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return export_trainable(self.stage.model, self.adapter, self.optimizer)

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        import_trainable(self.stage.model, self.adapter, self.optimizer, tensors, meta)


class Server:
    def __init__(self, train: TrainSection) -> None:
        self.train = train
        self.slots: dict[int, ServerSlot] = {}
        self.meter = ActivationMeter()
        self._unfinished: dict[int, ServerSlot] = {}

    def add_slot(self, devices: list[int], stage: Stage, adapter: str) -> ServerSlot:
        """Serve ``devices`` with the server-side ``stage`` and its LoRA ``adapter``."""
        params = list(adapter_parameters(stage.model, adapter).values())
        layers = [m for owned in stage.owned_modules() for m in lora_layers(owned)]
        slot = ServerSlot(
            stage, adapter, params, make_optimizer(params, self.train), layers, module_tensors(stage.owned_modules())
        )
        for device in devices:
            self.slots[device] = slot
        return slot

    def unique_slots(self) -> list[ServerSlot]:
        return list({id(s): s for s in self.slots.values()}.values())

    def process(self, arrivals: list[tuple[int, Message]]) -> dict[int, Message]:
        """Forward + backward for the activations of one group of devices.

        Devices on the same slot are processed as one concatenated batch whose loss is the
        token-weighted mean over all of them; each device receives d loss_u / d hidden_u
        (its own mean loss), so its update does not shrink with the number of devices.
        """
        replies: dict[int, Message] = {}
        by_slot: dict[int, list[tuple[int, Message]]] = {}
        for device, message in arrivals:
            by_slot.setdefault(id(self.slots[device]), []).append((device, message))
        self._unfinished = {key: self.slots[group[0][0]] for key, group in by_slot.items()}
        saved = 0  # the slots of one group run in parallel: their saved activations coexist
        for group in by_slot.values():
            replies.update(self._run_slot(self.slots[group[0][0]], group))
            saved += self.meter.last
        self.meter.record(saved)
        return replies

    def _run_slot(self, slot: ServerSlot, group: list[tuple[int, Message]]) -> dict[int, Message]:
        activate(slot.lora_layers, [slot.adapter])
        messages = [m for _, m in group]
        hidden = torch.cat([m.tensors["hidden"] for m in messages]).requires_grad_(True)  # (batch, seq, hidden)
        mask = torch.cat([m.tensors["attention_mask"] for m in messages])
        labels = torch.cat([m.tensors["labels"] for m in messages])
        sizes = [m.tensors["hidden"].shape[0] for m in messages]
        with self.meter.measure(exclude=slot.held_tensors):  # the loss's log-softmax is saved too
            logits = slot.stage(hidden, mask, position_ids_for(mask))
            sums, counts = zip(*(token_loss_sum(lg, lb) for lg, lb in zip(logits.split(sizes), labels.split(sizes))))
        total_tokens = max(sum(counts), 1)
        (sum(sums) / total_tokens).backward()
        slot.server_sq_norm = grad_sq_norm(slot.params)
        replies = {}
        for (device, message), grad, loss_sum, count in zip(group, hidden.grad.split(sizes), sums, counts):
            own_grad = grad * (total_tokens / count) if count else grad  # d loss_u / d hidden_u
            values = {"loss": loss_sum.item() / max(count, 1), "tokens": count, "server_sq_norm": slot.server_sq_norm}
            replies[device] = Message("activation_grad", "server", message.round, message.step, {"grad": own_grad}, values)
        return replies

    def finish(self, norms: dict[int, Message], lr: float) -> dict[int, Message]:
        """Clip on the joint norm (server LoRA + the devices' LoRA of this step), then step.

        A slot none of whose devices reported a norm (they dropped out after its forward) does
        not step; its gradients are discarded.
        """
        replies = {}
        for slot in {id(self.slots[d]): self.slots[d] for d in norms}.values():
            devices = [d for d in norms if self.slots[d] is slot]
            total_sq = slot.server_sq_norm + sum(float(norms[d].values["sq_norm"]) for d in devices)
            scale = clip_scale(total_sq, self.train.max_grad_norm)
            apply_step(slot.optimizer, slot.params, scale, lr)
            self._unfinished.pop(id(slot), None)
            for d in devices:
                replies[d] = Message("clip_scale", "server", norms[d].round, norms[d].step, values={"scale": scale})
        for slot in self._unfinished.values():
            slot.optimizer.zero_grad(set_to_none=True)
        self._unfinished = {}
        return replies

    # --- accounting ---------------------------------------------------------------------
    def held_bytes(self) -> int:
        slots = self.unique_slots()
        tensors = [t for s in slots for t in (*base_tensors(s.stage), *s.params, *optimizer_tensors(s.optimizer))]
        return unique_bytes(tensors)

    def peak_bytes(self) -> int:
        return self.held_bytes() + self.meter.peak

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for s in self.unique_slots() for p in s.params)

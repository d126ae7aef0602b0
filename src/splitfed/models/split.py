"""Split a Hugging Face causal LM into contiguous stages at cut layers.

A stage runs layers ``[start, end)``. The first stage also owns the embeddings, the last
the final norm and LM head. Each stage rebuilds the causal mask and position embeddings
from the attention mask and position ids it receives, so it never needs another stage's
weights. Stages are views: they reference the modules of one model object, so many
stages (one per simulated device) cost one base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from splitfed.models.families import Family, family_for, num_layers

IGNORE_INDEX = -100


@dataclass(frozen=True)
class StageSpec:
    start: int
    end: int
    first: bool
    last: bool

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def plan_stages(total_layers: int, cuts: list[int]) -> list[StageSpec]:
    """Stages for strictly increasing cuts in [1, total_layers - 1]; [] gives one whole-model stage.

    A cut k means layers [0, k) run before the boundary. cut == total_layers would leave the
    last stage without layers, which we reject: the head alone is not a useful stage.
    """
    bounds = [0, *cuts, total_layers]
    for a, b in zip(bounds, bounds[1:]):
        if not a < b:
            raise ValueError(
                f"cuts must be strictly increasing within [1, {total_layers - 1}] for a "
                f"{total_layers}-layer model; got {cuts}"
            )
    last = len(bounds) - 2
    return [StageSpec(a, b, i == 0, i == last) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


class Stage:
    """A contiguous slice of a causal LM. Not an nn.Module: it borrows the model's modules."""

    def __init__(self, model: nn.Module, spec: StageSpec, family: Family | None = None) -> None:
        self.model = model
        self.spec = spec
        self.family = family or family_for(model.config)
        self._layers = model.get_submodule(self.family.layers_path)
        weight = next(p for m in self.owned_modules() for n, p in m.named_parameters()
                      if ".lora_" not in f".{n}" and p.device.type != "meta")
        self.device, self.dtype = weight.device, weight.dtype
        """Where the stage's base weights are and their precision: what its inputs are moved and cast to."""

    def owned_modules(self) -> list[nn.Module]:
        """Modules whose weights this stage needs (what a process running it must hold)."""
        fam, get = self.family, self.model.get_submodule
        owned = [get(p) for p in fam.shared_paths]
        if self.spec.first:
            owned += [get(p) for p in fam.embed_paths]
        owned += [self._layers[i] for i in self.spec.layers]
        if self.spec.last:
            owned += [get(p) for p in fam.final_paths]
        return owned

    def forward(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """inputs: token ids (batch, seq) for the first stage, else hidden (batch, seq, hidden).

        Returns hidden (batch, seq, hidden), or logits (batch, seq, vocab) from the last stage.
        Inputs from another device or in another precision are moved and cast to the stage's.
        """
        attention_mask, position_ids = attention_mask.to(self.device), position_ids.to(self.device)
        if self.spec.first:
            hidden = self.family.embed(self.model, inputs.to(self.device), position_ids)
        else:
            hidden = inputs.to(self.device, self.dtype)
        mask = create_causal_mask(
            config=self.model.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        positions = self.family.position_embeddings(self.model, hidden, position_ids)
        extra = {} if positions is None else {"position_embeddings": positions}
        for index in self.spec.layers:
            hidden = self._layers[index](hidden, attention_mask=mask, position_ids=position_ids, **extra)
        if self.spec.last:
            return self.family.final(self.model, hidden)
        return hidden

    __call__ = forward


def split_model(model: nn.Module, cuts: list[int]) -> list[Stage]:
    """All stages of ``model`` for the given cuts (views sharing the model's weights)."""
    specs = plan_stages(num_layers(model.config), cuts)
    return [Stage(model, spec) for spec in specs]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..seq-1 per row (batch, seq); right padding keeps real tokens at 0..n-1."""
    batch, seq = attention_mask.shape
    return torch.arange(seq, device=attention_mask.device).unsqueeze(0).expand(batch, seq)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of counted tokens.

    logits: (batch, seq, vocab); labels: (batch, seq) with IGNORE_INDEX where no loss.
    The labels are shifted (not the logits), so the large logits tensor is never copied.
    Summing (not averaging) lets a server weight several devices' batches exactly.
    """
    targets = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=IGNORE_INDEX).reshape(-1)  # (batch * seq,)
    flat_logits = logits.float().reshape(-1, logits.shape[-1])  # a view for contiguous fp32 logits
    total = F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())

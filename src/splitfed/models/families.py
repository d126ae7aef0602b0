"""Architecture adapters: the few places where GPT-2 and the Llama family differ.

A family says where the embeddings, decoder layers and head live in a Hugging Face
causal LM, how to embed tokens, and how to call one decoder layer. Everything else
(splitting, LoRA, protocols) is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    name: str
    layers_path: str
    """Dotted path of the ModuleList of decoder layers, e.g. ``model.layers``."""
    embed_paths: tuple[str, ...]
    """Modules the first stage owns besides the layers (token/position embeddings)."""
    final_paths: tuple[str, ...]
    """Modules the last stage owns (final norm, LM head)."""
    shared_paths: tuple[str, ...]
    """Weight-free modules every stage rebuilds (rotary position embeddings)."""
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    """(model, input_ids (batch, seq), position_ids (batch, seq)) -> hidden (batch, seq, hidden)."""
    position_embeddings: Callable[[nn.Module, torch.Tensor, torch.Tensor], object]
    """(model, hidden, position_ids) -> whatever the layers need (rotary cos/sin) or None."""
    final: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(model, hidden) -> logits (batch, seq, vocab)."""
    fan_in_fan_out: bool = False
    """True where linear layers store (in, out) weights (GPT-2's Conv1D); PEFT needs to know."""

    @property
    def layers_pattern(self) -> str:
        """PEFT's ``layers_pattern``: the attribute name holding the layer list."""
        return self.layers_path.rsplit(".", 1)[-1]

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


def _llama_embed(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(input_ids)


def _llama_positions(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> object:
    return model.model.rotary_emb(hidden, position_ids=position_ids)


def _llama_final(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(hidden))


def _gpt2_embed(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    t = model.transformer
    return t.drop(t.wte(input_ids) + t.wpe(position_ids))


def _gpt2_final(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.transformer.ln_f(hidden))


LLAMA = Family(
    name="llama",
    layers_path="model.layers",
    embed_paths=("model.embed_tokens",),
    final_paths=("model.norm", "lm_head"),
    shared_paths=("model.rotary_emb",),
    embed=_llama_embed,
    position_embeddings=_llama_positions,
    final=_llama_final,
)

GPT2 = Family(
    name="gpt2",
    layers_path="transformer.h",
    embed_paths=("transformer.wte", "transformer.wpe", "transformer.drop"),
    final_paths=("transformer.ln_f", "lm_head"),
    shared_paths=(),
    embed=_gpt2_embed,
    position_embeddings=lambda model, hidden, position_ids: None,
    final=_gpt2_final,
    fan_in_fan_out=True,
)

# model_type -> family. The Llama family covers every model whose decoder layer takes
# (hidden, attention_mask, position_ids, position_embeddings) and lives at model.layers.
FAMILIES: dict[str, Family] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
}


def family_for(config: PretrainedConfig) -> Family:
    """The family of a model config; a clear error for unsupported architectures."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"model.source: architecture {config.model_type!r} is not supported; "
            f"allowed: {', '.join(sorted(FAMILIES))}"
        )
    return family


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)

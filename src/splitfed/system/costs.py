"""Memory cost of a device stage, from the model config alone (no weights loaded).

Used to turn a device's memory budget into its cut depth before any model is loaded.
Parameter counts are exact (the model is built on the meta device); the activation term is
an estimate of what autograd saves per layer for LoRA training in fp32 (documented in
docs/config.md, refined by the system-model work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from splitfed.models.families import family_for

FP32 = 4
ADAM_SLOTS = 2  # exp_avg, exp_avg_sq next to each trainable LoRA parameter


@dataclass(frozen=True)
class LayerCosts:
    embed_params: int
    """Parameters of the first stage's embeddings."""
    layer_params: int
    """Parameters of one decoder layer."""
    lora_params_per_rank: int
    """LoRA parameters per unit of rank in one layer for the target modules."""
    hidden: int
    intermediate: int


def layer_costs(config: PretrainedConfig, targets: list[str]) -> LayerCosts:
    family = family_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = sum(p.numel() for path in family.embed_paths for p in model.get_submodule(path).parameters())
    layer = model.get_submodule(family.layers_path)[0]
    per_rank = 0
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            per_rank += module.in_features + module.out_features
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    return LayerCosts(embed, sum(p.numel() for p in layer.parameters()), per_rank, hidden, intermediate)


def device_memory_bytes(costs: LayerCosts, cut: int, rank: int, batch: int, seq: int) -> int:
    """Estimated peak bytes of a device running embeddings + ``cut`` layers with LoRA rank ``rank``."""
    weights = (costs.embed_params + cut * costs.layer_params) * FP32
    lora = cut * costs.lora_params_per_rank * rank * FP32 * (1 + 1 + ADAM_SLOTS)  # weights, grads, Adam
    # Saved for backward per layer: norms, attention in/out, MLP in and the gated intermediate.
    activations = cut * batch * seq * (8 * costs.hidden + 3 * costs.intermediate) * FP32
    return weights + lora + activations


def deepest_cut(costs: LayerCosts, budget_bytes: float, max_cut: int, rank: int, batch: int, seq: int) -> int:
    """The largest cut in [1, max_cut] that fits the budget, or 0 if not even one layer fits."""
    fitting = [k for k in range(1, max_cut + 1) if device_memory_bytes(costs, k, rank, batch, seq) <= budget_bytes]
    return max(fitting, default=0)

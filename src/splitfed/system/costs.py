"""Compute, memory and message costs of model stages, from the model config alone (no weights).

Everything here is a count or an estimate derived from the architecture:

* FLOPs are exact counts of the matrix multiplications a stage runs (linear layers, LoRA
  and the two attention products, dense over all S x S positions), forward and backward
  for frozen base weights with LoRA: only the gradients autograd actually needs.
* Memory is weights + LoRA (weights, gradients, Adam state) + what autograd saves for
  backward. The saved-tensor coefficients (floats per token, per family) were counted on
  Hugging Face's Llama and GPT-2 layers with torch's SDPA on CPU; tests/system checks them
  against the roles' measured memory.
* Message sizes are payload bytes (hidden states at the cut, LoRA tensors) for a given
  number of bytes per element, so a codec can plug in its rate.

Used to turn a device's memory budget into its cut depth before any model is loaded, by the
simulated clock and by the schedulers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from splitfed.models.families import family_for

FP32 = 4
ADAM_SLOTS = 2  # exp_avg, exp_avg_sq next to each trainable LoRA parameter

# Role of each linear module of a decoder layer, by its path inside the layer. The roles
# decide which input gradients backward needs (see ``_layer_backward_flops``).
_ROLES: dict[str, dict[str, str]] = {
    "llama": {
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
        "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
        "mlp.down_proj": "mlp_out",
    },
    "gpt2": {"attn.c_attn": "qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"},
}


@dataclass(frozen=True)
class SavedFloats:
    """Floats per token that autograd saves for backward (LoRA training, fp32), by family.

    layer = hidden * h + intermediate * i + kv_dim * kv + heads * n + const, plus one float per
    unit of rank of every LoRA-targeted module; the first layer of a first stage saves
    ``h + first_layer_const`` less (its input needs no gradient); every stage
    adds ``stage_head_dim * head_dim`` (rotary cos/sin); the head adds h + vocab + ``head_const``.
    """

    hidden: int
    intermediate: int
    kv: int
    heads: int
    const: int
    first_layer_const: int
    stage_head_dim: int
    head_const: int


_SAVED: dict[str, SavedFloats] = {
    "llama": SavedFloats(hidden=5, intermediate=3, kv=2, heads=1, const=2, first_layer_const=1, stage_head_dim=2, head_const=3),
    "gpt2": SavedFloats(hidden=7, intermediate=4, kv=0, heads=1, const=4, first_layer_const=2, stage_head_dim=0, head_const=4),
}


@dataclass(frozen=True)
class Linear:
    role: str
    """q, k, v, qkv, attn_out, mlp_in or mlp_out."""
    in_features: int
    out_features: int
    lora: bool
    """True if LoRA targets this module."""
    path: str = ""
    """Path of the module inside a decoder layer, e.g. ``self_attn.q_proj``."""


@dataclass(frozen=True)
class LayerCosts:
    """Architecture numbers of a decoder-only LM, with LoRA on ``targets``."""

    embed_params: int
    """Parameters of the first stage's embeddings."""
    layer_params: int
    """Parameters of one decoder layer."""
    lora_params_per_rank: int
    """LoRA parameters per unit of rank in one layer for the target modules."""
    hidden: int
    intermediate: int
    family: str
    final_params: int
    """Parameters the last stage holds: final norm and LM head (tied or not, it holds the matrix)."""
    tied: bool
    """LM head shares the embedding matrix (a whole-model stage holds it once)."""
    vocab: int
    heads: int
    head_dim: int
    kv_dim: int
    """Width of the key (and of the value) projection: kv heads x head_dim."""
    linears: tuple[Linear, ...]
    """The linear modules of one decoder layer."""
    layers_path: str = ""
    """Path of the decoder layer list in the model, e.g. ``model.layers`` (names the adapter tensors)."""

    @property
    def lora_modules(self) -> int:
        return sum(linear.lora for linear in self.linears)


def _shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear module (nn.Linear, or GPT-2's Conv1D storing (in, out))."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    return None


_CACHE: dict[tuple[str, tuple[str, ...]], LayerCosts] = {}


def layer_costs(config: PretrainedConfig, targets: list[str]) -> LayerCosts:
    """Read the architecture numbers from a model config (the model is built on the meta device;
    cached per config and targets, since planners and clocks ask for them often)."""
    key = (config.to_json_string(use_diff=False), tuple(targets))
    if key not in _CACHE:
        _CACHE[key] = _layer_costs(config, targets)
    return _CACHE[key]


def _layer_costs(config: PretrainedConfig, targets: list[str]) -> LayerCosts:
    family = family_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    def count(paths: tuple[str, ...]) -> int:
        return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())

    layer = model.get_submodule(family.layers_path)[0]
    roles = _ROLES[family.name]
    linears = []
    for name, module in layer.named_modules():
        shape = _shape(module)
        if shape is not None and name in roles:
            linears.append(Linear(roles[name], *shape, lora=name.rsplit(".", 1)[-1] in targets, path=name))
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    return LayerCosts(
        embed_params=count(family.embed_paths),
        layer_params=sum(p.numel() for p in layer.parameters()),
        lora_params_per_rank=sum(lin.in_features + lin.out_features for lin in linears if lin.lora),
        hidden=hidden,
        intermediate=intermediate,
        family=family.name,
        final_params=count(family.final_paths),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        vocab=int(config.vocab_size),
        heads=heads,
        head_dim=head_dim,
        kv_dim=kv_heads * head_dim,
        linears=tuple(linears),
        layers_path=family.layers_path,
    )


# --- FLOPs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _layer_forward_flops(costs: LayerCosts, tokens: int, seq: int, rank: int) -> float:
    linear = sum(lin.in_features * lin.out_features for lin in costs.linears)
    lora = sum(rank * (lin.in_features + lin.out_features) for lin in costs.linears if lin.lora)
    attention = 2 * costs.heads * seq * costs.head_dim  # per token, for each of Q K^T and P V
    return 2.0 * tokens * (linear + lora + attention)


def _layer_backward_flops(costs: LayerCosts, tokens: int, seq: int, rank: int, input_grad: bool) -> float:
    """Backward FLOPs of one layer with frozen base weights: input gradients where autograd needs
    them, plus LoRA weight gradients. ``input_grad``: the layer's input requires a gradient."""
    lora_roles = {lin.role for lin in costs.linears if lin.lora}
    fused = "qkv" in lora_roles
    q_grad = input_grad or fused or "q" in lora_roles
    k_grad = input_grad or fused or "k" in lora_roles
    v_grad = input_grad or fused or "v" in lora_roles
    attn_grad = q_grad or k_grad or v_grad
    residual_grad = input_grad or attn_grad or "attn_out" in lora_roles
    mlp_mid_grad = residual_grad or "mlp_in" in lora_roles
    needs_input_grad = {
        "q": input_grad, "k": input_grad, "v": input_grad, "qkv": input_grad,
        "attn_out": attn_grad, "mlp_in": residual_grad, "mlp_out": mlp_mid_grad,
    }
    per_token = 0.0
    for lin in costs.linears:
        grad_in = needs_input_grad[lin.role]
        per_token += lin.in_features * lin.out_features * grad_in
        if lin.lora:  # weight grads of A and B, input grad of B, input grad of A if needed
            per_token += rank * ((lin.in_features + lin.out_features) + lin.out_features + lin.in_features * grad_in)
    products = q_grad + k_grad + (q_grad or k_grad) + v_grad  # dQ, dK, dP, dV
    per_token += products * costs.heads * seq * costs.head_dim
    return 2.0 * tokens * per_token


def stage_flops(costs: LayerCosts, layers: int, batch: int, seq: int, rank: int, first: bool, last: bool) -> Flops:
    """FLOPs of one training step of a stage: ``layers`` decoder layers (+ LM head if ``last``)
    on ``batch`` sequences of ``seq`` tokens with LoRA rank ``rank``. The input of a first
    stage (token ids) needs no gradient; any other stage returns d loss / d input."""
    tokens = batch * seq
    forward = layers * _layer_forward_flops(costs, tokens, seq, rank)
    layer_backward = _layer_backward_flops(costs, tokens, seq, rank, input_grad=True)
    backward = layers * layer_backward
    if first and layers:  # the first layer's input (embeddings) needs no gradient
        backward += _layer_backward_flops(costs, tokens, seq, rank, input_grad=False) - layer_backward
    if last:
        head = head_flops(costs, batch, seq)
        forward, backward = forward + head.forward, backward + head.backward
    return Flops(forward, backward)


def head_flops(costs: LayerCosts, batch: int, seq: int) -> Flops:
    """FLOPs of the LM head of one training step (the last stage's, included in its ``stage_flops``):
    the logits forward, d loss / d hidden backward (the head is frozen). The loss over the vocabulary
    adds no matrix products; a measured profile prices both at the head's own speed."""
    head = 2.0 * batch * seq * costs.hidden * costs.vocab
    return Flops(head, head)


# --- bytes on the wire -------------------------------------------------------------------


def activation_bytes(costs: LayerCosts, batch: int, seq: int, bytes_per_element: float = FP32) -> float:
    """Payload bytes of the hidden states (or their gradient) at a cut: batch x seq x hidden."""
    return batch * seq * costs.hidden * bytes_per_element


def adapter_bytes(costs: LayerCosts, layers: int, rank: int, bytes_per_element: float = FP32) -> float:
    """Payload bytes of the LoRA tensors of ``layers`` layers at rank ``rank``."""
    return layers * costs.lora_params_per_rank * rank * bytes_per_element


# --- memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Bytes of a stage's training state."""

    weights: float
    """Frozen base weights."""
    lora: float
    """LoRA weights, gradients and Adam state."""
    activations: float
    """Tensors autograd saves for backward during one step."""

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations


def weight_bytes(costs: LayerCosts, layers: int, first: bool, last: bool) -> float:
    params = layers * costs.layer_params + first * costs.embed_params + last * costs.final_params
    if first and last and costs.tied:
        params -= costs.vocab * costs.hidden  # the LM head is the embedding matrix
    return params * FP32


def lora_state_bytes(costs: LayerCosts, layers: int, rank: int) -> float:
    """LoRA weights + gradients + Adam state of ``layers`` layers."""
    return adapter_bytes(costs, layers, rank) * (2 + ADAM_SLOTS)


def saved_activation_bytes(costs: LayerCosts, layers: int, rank: int, batch: int, seq: int, first: bool, last: bool) -> float:
    saved = _SAVED[costs.family]
    h = costs.hidden
    per_layer = (
        saved.hidden * h + saved.intermediate * costs.intermediate + saved.kv * costs.kv_dim
        + saved.heads * costs.heads + saved.const + rank * costs.lora_modules
    )
    per_token = layers * per_layer + saved.stage_head_dim * costs.head_dim
    if first and layers:
        per_token -= h + saved.first_layer_const
    if last:
        per_token += h + costs.vocab + saved.head_const  # final norm input, log-softmax of the loss
    return batch * seq * per_token * FP32


def stage_memory(costs: LayerCosts, layers: int, rank: int, batch: int, seq: int, first: bool, last: bool) -> Memory:
    """Peak training memory of one stage holding ``layers`` layers with LoRA rank ``rank``."""
    return Memory(
        weight_bytes(costs, layers, first, last),
        lora_state_bytes(costs, layers, rank),
        saved_activation_bytes(costs, layers, rank, batch, seq, first, last),
    )


def device_memory_bytes(costs: LayerCosts, cut: int, rank: int, batch: int, seq: int) -> int:
    """Estimated peak bytes of a device running embeddings + ``cut`` layers with LoRA rank ``rank``."""
    return int(stage_memory(costs, cut, rank, batch, seq, first=True, last=False).total)


def server_memory_bytes(
    costs: LayerCosts, total_layers: int, slots: list[tuple[int, int, int]], seq: int, *, copies: bool, parallel: bool
) -> int:
    """Estimated peak bytes of a server.

    ``slots``: one (cut, rank, batch) per server-side LoRA: it trains layers [cut, total_layers)
    plus the head on ``batch`` sequences. ``copies``: each slot has its own copy of the base
    weights (SplitFed-V1) instead of sharing one model from the smallest cut. ``parallel``: the
    slots' saved activations coexist (else the server serves one slot at a time).
    """
    if not slots:
        raise ValueError("server_memory_bytes needs at least one slot")
    weights = (
        sum(weight_bytes(costs, total_layers - cut, False, True) for cut, _, _ in slots)
        if copies
        else weight_bytes(costs, total_layers - min(cut for cut, _, _ in slots), False, True)
    )
    lora = sum(lora_state_bytes(costs, total_layers - cut, rank) for cut, rank, _ in slots)
    saved = [saved_activation_bytes(costs, total_layers - cut, rank, batch, seq, False, True) for cut, rank, batch in slots]
    return int(weights + lora + (sum(saved) if parallel else max(saved)))


def deepest_cut(costs: LayerCosts, budget_bytes: float, max_cut: int, rank: int, batch: int, seq: int) -> int:
    """The largest cut in [1, max_cut] that fits the budget, or 0 if not even one layer fits."""
    fitting = [k for k in range(1, max_cut + 1) if device_memory_bytes(costs, k, rank, batch, seq) <= budget_bytes]
    return max(fitting, default=0)

"""LoRA adapters through PEFT: many named adapters on ONE frozen base model.

Slots train on named adapters injected into the shared base with ``peft.inject_adapter_in_model``
(a few, lent by ``adapters.pool`` to the slots whose turn it is); only the adapters of the role
whose turn it is are active. Adapter state is exchanged as plain tensor
dicts keyed the way PEFT saves them (``model.layers.3.self_attn.q_proj.lora_A.weight``),
so the global adapter exports straight to PEFT's on-disk format.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from splitfed.adapters.layout import AdapterLayout
from splitfed.models.families import Family

AdapterState = dict[str, torch.Tensor]
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def make_lora_config(
    family: Family, targets: list[str], rank: int, alpha_per_rank: float, layers: list[int], dropout: float = 0.0
) -> LoraConfig:
    """LoRA on ``targets`` of ``layers`` with rank ``rank``.

    alpha grows with the rank (alpha = alpha_per_rank * rank), so the scaling alpha / r is
    the same for every device whatever its rank: zero-padding a low-rank adapter to a
    higher rank then leaves its product B A, and so the model, unchanged.
    """
    return LoraConfig(
        r=rank,
        lora_alpha=alpha_per_rank * rank,
        target_modules=list(targets),
        layers_to_transform=list(layers),
        layers_pattern=family.layers_pattern,
        lora_dropout=dropout,
        bias="none",
        fan_in_fan_out=family.fan_in_fan_out,
    )


def layout_config(family: Family, layout: AdapterLayout, dropout: float = 0.0) -> LoraConfig:
    """The PEFT LoraConfig of an adapter with ``layout`` (a placement names each module by its full
    path, with its rank in ``rank_pattern``)."""
    if not layout.placement:
        return make_lora_config(family, list(layout.targets), layout.rank, layout.alpha_per_rank,
                                list(layout.layers), dropout)
    paths = {f"{family.layer_prefix(layer)}{path}": rank for layer, path, rank in layout.placement}
    return LoraConfig(
        r=layout.rank,
        lora_alpha=layout.alpha,
        target_modules=sorted(paths),
        rank_pattern={p: r for p, r in paths.items() if r != layout.rank},
        alpha_pattern={p: layout.alpha_per_rank * r for p, r in paths.items() if r != layout.rank},
        lora_dropout=dropout,
        bias="none",
        fan_in_fan_out=family.fan_in_fan_out,
    )


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer of ``model`` (so that one of another layout can take its name)."""
    for layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
    getattr(model, "peft_config", {}).pop(name, None)


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Inject a new named adapter into ``model`` (in place), in float32 whatever the base's dtype: PEFT
    casts a new adapter to its base layer's dtype (its initial values pass through that dtype once),
    and its forward casts inputs to the adapter's dtype and the sum back to the base's."""
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    params = adapter_parameters(model, name)
    for param in params.values():
        if param.dtype != torch.float32:
            param.data = param.data.float()
    if not params:
        raise ValueError(
            f"lora.targets {config.target_modules} matched no module in layers "
            f"{sorted(config.layers_to_transform)}; check the module names of this architecture"
        )


def _canonical(param_name: str, adapter: str) -> str | None:
    marker = f".{adapter}."
    if ".lora_" not in param_name or marker not in param_name:
        return None
    return param_name.replace(marker, ".", 1)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The trainable tensors of adapter ``name``, keyed canonically (adapter name removed)."""
    found = {}
    for param_name, param in model.named_parameters():
        key = _canonical(param_name, name)
        if key is not None:
            found[key] = param
    return found


def get_adapter_state(model: nn.Module, name: str) -> AdapterState:
    """Copies of adapter ``name``'s tensors on the CPU (where aggregation runs, whatever the model's device)."""
    return {k: p.detach().to("cpu").clone() for k, p in adapter_parameters(model, name).items()}


def set_adapter_state(model: nn.Module, name: str, state: AdapterState, strict: bool = True) -> None:
    """Copy ``state`` into adapter ``name``; tensors are fitted to each slot's rank (HetLoRA
    truncation / zero padding). With strict, every slot of the adapter must be in ``state``."""
    load_factors(adapter_parameters(model, name), state, strict, name)


def load_factors(params: dict[str, nn.Parameter], state: AdapterState, strict: bool = True, label: str = "") -> None:
    """Copy ``state`` into the adapter tensors ``params`` (canonical keys), each fitted to its rank."""
    fitted = fit_state(state, {k: p.shape for k, p in params.items()}, strict, label)
    with torch.no_grad():
        for key, tensor in fitted.items():
            params[key].copy_(tensor)


def fit_state(state: AdapterState, shapes: dict[str, tuple[int, ...]], strict: bool = True,
              label: str = "") -> AdapterState:
    """The tensors of ``state`` an adapter with ``shapes`` takes, each fitted to its rank (``fit_rank``)."""
    missing = set(shapes) - set(state)
    if strict and missing:
        raise KeyError(f"adapter {label!r}: state lacks {sorted(missing)[:3]} (and {max(0, len(missing) - 3)} more)")
    return {key: fit_rank(state[key], torch.Size(shape)) for key, shape in shapes.items() if key in state}


def fit_rank(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Truncate or zero-pad a LoRA factor along its rank axis to ``shape``.

    lora_A is (rank, in_features), lora_B is (out_features, rank).
    """
    if tensor.shape == shape:
        return tensor
    out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    rows, cols = min(shape[0], tensor.shape[0]), min(shape[1], tensor.shape[1])
    out[:rows, :cols] = tensor[:rows, :cols]
    return out


def target_modules(model: nn.Module, family: Family, layers, targets) -> dict[str, nn.Module]:
    """Full path -> module, for every module of ``layers`` named by ``targets`` (``q_proj`` or ``self_attn.q_proj``)."""
    targets = tuple(targets)
    found = {}
    for layer in layers:
        prefix = family.layer_prefix(layer)
        for name, module in model.get_submodule(prefix.rstrip(".")).named_modules():
            if name and any(name == t or name.endswith(f".{t}") for t in targets):
                found[prefix + name] = module
    return found


def lora_layers(*modules: nn.Module) -> list[LoraLayer]:
    """The LoRA-wrapped layers inside ``modules`` (a model, or the modules a stage owns)."""
    return [m for module in modules for m in module.modules() if isinstance(m, LoraLayer)]


def activate(layers: list[LoraLayer], names: list[str]) -> None:
    """Make ``names`` the active adapters for the forward passes that follow.

    PEFT's set_adapter also freezes the inactive adapters; we undo that because another
    device's forward graph may still be waiting for its backward pass.
    """
    for layer in layers:
        layer.set_adapter(names)
    unfreeze(layers)


def unfreeze(layers: list[LoraLayer]) -> None:
    """Let every adapter of ``layers`` take gradients again (PEFT freezes the inactive ones when it activates
    or adds an adapter; a leaf that stops requiring grad silently drops the gradient of a pending backward)."""
    for layer in layers:
        for factors in (layer.lora_A, layer.lora_B):
            for module in factors.values():
                module.requires_grad_(True)


def layer_of(key: str, family: Family) -> int:
    """Decoder-layer index of a canonical adapter key."""
    prefix = family.layers_path + "."
    if not key.startswith(prefix):
        raise ValueError(f"adapter key {key!r} is not under {family.layers_path}")
    return int(key[len(prefix) :].split(".", 1)[0])


def slice_layers(state: AdapterState, family: Family, layers: range) -> AdapterState:
    """The part of an adapter state on the given decoder layers."""
    return {k: v for k, v in state.items() if layer_of(k, family) in layers}


def state_bytes(state: AdapterState) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def rank_patterns(state: AdapterState, rank: int, alpha_per_rank: float) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` for the modules of ``state`` whose rank is not ``rank``."""
    ranks, alphas = {}, {}
    for key, tensor in sorted(state.items()):
        if ".lora_A." in key and tensor.shape[0] != rank:
            module = key.split(".lora_A.", 1)[0]
            ranks[module] = int(tensor.shape[0])
            alphas[module] = alpha_per_rank * int(tensor.shape[0])
    return ranks, alphas


def save_peft_adapter(state: AdapterState, config: LoraConfig, directory: Path, base_model: str) -> None:
    """Write ``state`` in PEFT's format, loadable by ``PeftModel.from_pretrained(base, directory)``.

    Modules whose rank differs from ``config.r`` are listed in ``rank_pattern`` / ``alpha_pattern``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights = {f"base_model.model.{k}": v.contiguous() for k, v in state.items()}
    save_file(weights, directory / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    config_tree = config.to_dict()
    config_tree["base_model_name_or_path"] = base_model
    config_tree["target_modules"] = sorted(config_tree["target_modules"])
    config_tree["task_type"] = "CAUSAL_LM"
    ranks, alphas = rank_patterns(state, config.r, config.lora_alpha / config.r)
    config_tree["rank_pattern"], config_tree["alpha_pattern"] = ranks, alphas
    (directory / "adapter_config.json").write_text(json.dumps(config_tree, indent=2, default=list))

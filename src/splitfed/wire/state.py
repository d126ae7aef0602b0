"""Nested training state (optimizer state dicts, stream positions) as tensors + JSON.

``flatten`` moves every tensor of a nested dict/list structure into a flat name -> tensor
map and returns the JSON-able rest with references; ``unflatten`` reverses it. Used for
checkpoints on disk and for role state sent between processes, so neither needs pickle.
"""

from __future__ import annotations

import torch


def flatten(prefix: str, value: object, tensors: dict[str, torch.Tensor]) -> object:
    """Move tensors out of ``value`` into ``tensors`` (keys under ``prefix``); return the JSON-able rest."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        items = [[flatten(f"{prefix}/k{i}", k, tensors), flatten(f"{prefix}/{i}", v, tensors)]
                 for i, (k, v) in enumerate(value.items())]
        return {"__dict__": items}
    if isinstance(value, (list, tuple)):
        return [flatten(f"{prefix}/{i}", v, tensors) for i, v in enumerate(value)]
    return value


def unflatten(value: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    return value

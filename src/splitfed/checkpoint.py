"""Round checkpoints: everything needed to resume a run exactly (no pickle).

A checkpoint holds the global adapter, every role's adapter and optimizer state, every
device's batch-stream position and the round/step counters. Tensors go to a safetensors
file, everything else to JSON; a round's directory is written under a temporary name and
renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitfed.adapters.lora import get_adapter_state, set_adapter_state
from splitfed.protocols.base import Protocol

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
LATEST = "latest"


def _flatten(prefix: str, value: object, tensors: dict[str, torch.Tensor]) -> object:
    """Move tensors out of a nested structure into ``tensors``; return the JSON-able rest."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().clone().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(f"{prefix}/k{i}", k, tensors), _flatten(f"{prefix}/{i}", v, tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return [_flatten(f"{prefix}/{i}", v, tensors) for i, v in enumerate(value)]
    return value


def _unflatten(value: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def _roles(protocol: Protocol) -> dict[str, tuple[torch.nn.Module, str, torch.optim.Optimizer]]:
    """Every trainable role state: name -> (model holding the adapter, adapter name, optimizer)."""
    roles = {f"device{u}": (d.stage.model, d.adapter, d.optimizer) for u, d in protocol.devices.items()}
    server = getattr(protocol, "server", None)
    for slot in server.unique_slots() if server else []:
        roles[slot.adapter] = (slot.stage.model, slot.adapter, slot.optimizer)
    return roles


def save_checkpoint(protocol: Protocol, directory: Path, round_index: int, base_loss: float) -> Path:
    tensors: dict[str, torch.Tensor] = {f"global/{k}": v for k, v in protocol.aggregator.global_state.items()}
    meta: dict[str, object] = {"round": round_index, "step_index": protocol.step_index, "base_loss": base_loss}
    for role, (model, adapter, optimizer) in _roles(protocol).items():
        tensors.update({f"{role}/adapter/{k}": v for k, v in get_adapter_state(model, adapter).items()})
        meta[f"{role}/optimizer"] = _flatten(f"{role}/optimizer", optimizer.state_dict(), tensors)
    for u, device in protocol.devices.items():
        meta[f"device{u}/stream"] = _flatten(f"device{u}/stream", device.stream.state_dict(), tensors)
    meta["rng"] = _flatten("rng", torch.get_rng_state(), tensors)

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{round_index:04d}"
    staging = directory / f".staging-{round_index:04d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(tensors, staging / TENSORS_FILE)
    (staging / META_FILE).write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    (directory / f"{LATEST}.tmp").write_text(final.name)
    os.replace(directory / f"{LATEST}.tmp", directory / LATEST)
    return final


def load_checkpoint(protocol: Protocol, directory: Path) -> tuple[int, float]:
    """Restore the latest checkpoint into ``protocol``; return (next round, base eval loss)."""
    if not (directory / LATEST).is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {directory}")
    path = directory / (directory / LATEST).read_text().strip()
    tensors = load_file(path / TENSORS_FILE)
    meta = json.loads((path / META_FILE).read_text())
    protocol.aggregator.global_state = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
    for role, (model, adapter, optimizer) in _roles(protocol).items():
        prefix = f"{role}/adapter/"
        set_adapter_state(model, adapter, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer.load_state_dict(_unflatten(meta[f"{role}/optimizer"], tensors))
    for u, device in protocol.devices.items():
        device.stream.load_state_dict(_unflatten(meta[f"device{u}/stream"], tensors))
    torch.set_rng_state(_unflatten(meta["rng"], tensors))
    protocol.step_index = meta["step_index"]
    return meta["round"] + 1, meta["base_loss"]

"""Round checkpoints: everything needed to resume a run exactly (no pickle).

A checkpoint holds the global adapter, every worker's adapters and optimizer states (per
slot), every first stage's batch-stream position, the error-feedback residuals of compressed
streams, the RNG state and the round/step counters. Workers are found in the protocol's
topology, local or remote alike. Tensors go to
a safetensors file, everything else to JSON; a round's directory is written under a
temporary name and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitfed.protocols.base import Protocol
from splitfed.runtime.remote import DeviceDropped
from splitfed.wire.state import flatten, unflatten

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
LATEST = "latest"
LINK = "link/"
log = logging.getLogger("splitfed.checkpoint")


def save_checkpoint(protocol: Protocol, directory: Path, round_index: int, base_loss: float) -> Path:
    tensors: dict[str, torch.Tensor] = {f"global/{k}": v for k, v in protocol.aggregator.global_state.items()}
    meta: dict[str, object] = {"round": round_index, "step_index": protocol.step_index, "base_loss": base_loss}
    tensors.update({f"{LINK}{k}": v for k, v in protocol.link.export_state().items()})
    for name, role in protocol.workers.items():
        try:
            role_tensors, role_meta = role.export_state()
        except DeviceDropped as error:  # an unreachable device restarts from the global adapter
            log.warning("checkpoint of round %d lacks %s: %s", round_index, name, error.reason)
            continue
        tensors.update({f"{name}/{k}": v for k, v in role_tensors.items()})
        meta[name] = role_meta
    meta["rng"] = flatten("rng", torch.get_rng_state(), tensors)

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
    protocol.link.import_state({k[len(LINK):]: v for k, v in tensors.items() if k.startswith(LINK)})
    for name, role in protocol.workers.items():
        if name not in meta:
            continue
        prefix = f"{name}/"
        role.import_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta[name])
    torch.set_rng_state(unflatten(meta["rng"], tensors))
    protocol.step_index = meta["step_index"]
    return meta["round"] + 1, meta["base_loss"]

"""Build the device roles a process hosts: one base stage model, one adapter per device.

Used by a gRPC device process (one device) and by a Ray host actor (many devices). The
process loads only the layers its devices run (the deepest cut among them), builds the
same data partition as every other process from the config and seed, and keeps its own.
"""

from __future__ import annotations

import torch

from splitfed.adapters.lora import add_adapter
from splitfed.config import SPLIT_PROTOCOLS, RunConfig
from splitfed.models.families import family_for, num_layers
from splitfed.models.loading import load_model_config, load_stage_model, load_tokenizer, prepare_model
from splitfed.models.split import Stage, StageSpec
from splitfed.protocols.base import lora_config
from splitfed.seeding import derive_seed
from splitfed.roles.device import Device
from splitfed.run import build_data, plan_run


def device_spec(config: RunConfig, cuts: list[int], device: int, total_layers: int) -> StageSpec:
    """The stage a device runs: its first ``cut`` layers, or the whole model for unsplit protocols."""
    if config.protocol in SPLIT_PROTOCOLS:
        return StageSpec(0, cuts[device], first=True, last=False)
    return StageSpec(0, total_layers, first=True, last=True)


def host_devices(config: RunConfig, devices: list[int]) -> dict[int, Device]:
    plan = plan_run(config)
    model_dir = str(prepare_model(config.model.source))
    total = num_layers(load_model_config(config.model.source))
    specs = {u: device_spec(config, plan.cuts, u, total) for u in devices}
    cover = StageSpec(0, max(s.end for s in specs.values()), first=True, last=any(s.last for s in specs.values()))
    model = load_stage_model(model_dir, cover)
    family = family_for(model.config)
    data = build_data(plan, load_tokenizer(config.model.source))
    roles = {}
    for u in devices:
        torch.manual_seed(derive_seed(config.seed, 4, u))  # overwritten by the first download anyway
        add_adapter(model, f"device{u}", lora_config(config, family, config.device_rank(u), specs[u].layers))
        stage = Stage(model, specs[u], family)
        roles[u] = Device(u, stage, f"device{u}", data.train[u], config.train, derive_seed(config.seed, 1, u))
    return roles

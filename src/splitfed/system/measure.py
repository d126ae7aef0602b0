"""Measure this machine as a device or server profile (``splitfed profile``).

The clock and the planners price compute as FLOPs / (FLOP/s of the machine). The declared device
classes (``system.profiles``) are round numbers; this module times real training steps of the
configured model on this machine, one first stage per cut (LoRA of the configured rank and targets,
the configured batch and sequence length, the base in ``compute.dtype`` on the ``compute.device``
placement: profile a GPU with ``--set compute.device='"cuda"'``), and divides the cost model's FLOPs of that stage by
the measured time; the LM head and loss (a last stage without layers) are timed on their own, since
over a large vocabulary they need not run at the layers' speed; the clock prices them at their own
(``head_flops``). The result is a profile file that ``system.device_classes`` and ``system.server``
accept in place of a class name. The radio (transmit power, distance) is not measured: the file
carries the ``laptop`` class's values, and says so.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from splitfed.adapters.layout import AdapterLayout
from splitfed.adapters.lora import activate, add_adapter, layout_config, lora_layers, remove_adapter
from splitfed.config import RunConfig
from splitfed.models.families import family_for, num_layers
from splitfed.models.loading import load_model
from splitfed.models.split import Stage, StageSpec, position_ids_for, token_loss_sum
from splitfed.roles.accounting import ActivationMeter, module_tensors
from splitfed.system.costs import head_flops, layer_costs, stage_flops, weight_bytes
from splitfed.system.profiles import DEVICE_CLASSES, PROFILE_KIND

RADIO_DEFAULTS = "laptop"
"""The device class whose transmit power and distances a measured profile carries (not measured)."""


def default_cuts(total_layers: int) -> list[int]:
    """A few cuts from shallow to the whole model: 1, a quarter, a half, all layers."""
    return sorted({1, max(1, total_layers // 4), max(1, total_layers // 2), total_layers})


def _time_stage(stage: Stage, batch: int, seq: int, repeats: int) -> tuple[float, float, int]:
    """Median forward and backward seconds of one training step of ``stage`` (one warm-up step first),
    and the bytes autograd saved for backward. A first stage gets token ids, any other stage hidden
    states that need a gradient (as a server's do)."""
    generator = torch.Generator().manual_seed(0)
    config = stage.model.config
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)  # (batch, seq)
    mask = torch.ones_like(ids)
    inputs = ids if stage.spec.first else (
        torch.randn(batch, seq, config.hidden_size, generator=generator)  # (batch, seq, hidden)
        .to(stage.device, stage.dtype).requires_grad_(True))
    meter, held = ActivationMeter(), module_tensors(stage.owned_modules())
    device = stage.device

    def now() -> float:  # accelerators run asynchronously: wait for their work before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    forward, backward = [], []
    for repeat in range(repeats + 1):
        started = now()
        with meter.measure(held, device):
            out = stage(inputs, mask, position_ids_for(mask))
            if stage.spec.last:
                loss_sum, tokens = token_loss_sum(out, ids)
                out = loss_sum / max(tokens, 1)
        middle = now()
        out.backward(None if stage.spec.last else torch.ones_like(out))  # a server's gradient costs the same
        ended = now()
        stage.model.zero_grad(set_to_none=True)
        if repeat:  # the first step warms up allocator and kernels
            forward.append(middle - started)
            backward.append(ended - middle)
    return statistics.median(forward), statistics.median(backward), meter.last


def profile_machine(config: RunConfig, cuts: list[int], repeats: int = 3,
                    progress: Callable[[dict], None] | None = None) -> dict:
    """Time a training step of the first stage at each of ``cuts`` on this machine; returns the profile
    (JSON-able): ``flops`` is the median over the cuts (those without the LM head, if any) of FLOPs /
    measured seconds; ``head_flops`` that of the LM head and loss alone."""
    device = config.compute.torch_device("device")
    model = load_model(config.model.source, config.compute.torch_dtype, device)
    model.requires_grad_(False)
    family = family_for(model.config)
    total = num_layers(model.config)
    bad = [c for c in cuts if not 1 <= c <= total]
    if bad:
        raise ValueError(f"--cuts {bad}: allowed 1..{total} (this model's layers)")
    costs = layer_costs(model.config, config.lora.targets)
    lora, train = config.lora, config.train
    stages = []
    for cut in cuts:
        last = cut == total
        name = f"profile{cut}"
        add_adapter(model, name, layout_config(family, AdapterLayout(range(cut), tuple(lora.targets), lora.rank,
                                                                     lora.alpha / lora.rank)))
        stage = Stage(model, StageSpec(0, cut, True, last), family)
        activate(lora_layers(*stage.owned_modules()), [name])
        forward_s, backward_s, saved = _time_stage(stage, train.batch_size, train.seq_len, repeats)
        flops = stage_flops(costs, cut, train.batch_size, train.seq_len, lora.rank, True, last)
        entry = {"cut": cut, "layers": cut, "lm_head": last, "forward_s": forward_s, "backward_s": backward_s,
                 "flops": flops.total, "flop_per_s": flops.total / (forward_s + backward_s),
                 "forward_flop_per_s": flops.forward / forward_s, "backward_flop_per_s": flops.backward / backward_s,
                 "weight_bytes": int(weight_bytes(costs, cut, True, last) * model.dtype.itemsize / 4),
                 "saved_activation_bytes": saved,
                 "saved_activation_bytes_per_layer": saved / cut}
        stages.append(entry)
        remove_adapter(model, name)
        if progress is not None:
            progress(entry)
    # The LM head and the loss over the vocabulary alone (a last stage with no layers): they run at
    # their own speed, which the clock gives a last stage's head.
    head = Stage(model, StageSpec(total, total, False, True), family)
    forward_s, backward_s, _ = _time_stage(head, train.batch_size, train.seq_len, repeats)
    flops = head_flops(costs, train.batch_size, train.seq_len)
    head_entry = {"forward_s": forward_s, "backward_s": backward_s, "flops": flops.total,
                  "flop_per_s": flops.total / (forward_s + backward_s)}
    if progress is not None:
        progress({"cut": "head", "layers": 0, "lm_head": True, **head_entry})
    # the layers' speed: a stage that also ran the head mixes in the head's speed, which has its own entry
    layer_stages = [s for s in stages if not s["lm_head"]] or stages
    radio = DEVICE_CLASSES[RADIO_DEFAULTS]
    return {
        "kind": PROFILE_KIND, "version": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "model": config.model.source, "device": str(device), "dtype": config.compute.dtype, "batch_size": train.batch_size, "seq_len": train.seq_len,
        "lora_rank": lora.rank, "lora_targets": list(lora.targets), "repeats": repeats,
        "flops": statistics.median(s["flop_per_s"] for s in layer_stages),
        "head_flops": head_entry["flop_per_s"],
        "memory_bytes": (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                         else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "max_power_w": radio.max_power_w, "distance_m": list(radio.distance_m),
        "radio": f"not measured: the {RADIO_DEFAULTS!r} class's transmit power and distances",
        "memory": ("the GPU's memory; per stage, weights from the cost model and the allocator's peak during the forward "
                   "pass" if device.type == "cuda" else
                   "host memory of this machine; per stage, weights from the cost model and activations saved for "
                   "backward as counted by the roles' meter (the CPU allocator keeps no peak statistics)"),
        "stages": stages,
        "head": head_entry,
    }

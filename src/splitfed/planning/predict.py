"""Predict a run's simulated time by replaying its rounds through the simulated clock.

The clock is the one every run uses; what a run learns only at run time (the bytes of each
message) is predicted from the wire format (``system.traffic``), and the server's serving
order is computed the way the protocols compute it. So a plan's prediction and the run's
``sim_s`` differ only by what the byte prediction misses (zstd on real data, a few digits).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from splitfed.config import RunConfig
from splitfed.planning.schedule import serving_order
from splitfed.run import resolve_cuts
from splitfed.system.clock import Clock, predicted_memory
from splitfed.system.costs import device_memory_bytes
from splitfed.system.traffic import adapter_message_bytes


@dataclass(frozen=True)
class Prediction:
    """What a run of a config would record: ``sim_s`` per round, and the predicted peak memory."""

    round_s: list[float]
    first_order: list[int]
    device_memory_bytes: list[int]
    server_memory_bytes: int


def serving_groups(config: RunConfig, clock: Clock, participants: list[int], step_index: int) -> list[list[int]]:
    """Devices the server serves together, in order (as protocols sfl / memsfl / sflv1 do)."""
    if config.protocol == "memsfl":
        return [[u] for u in serving_order(clock, participants, config.server.scheduler, config.seed, step_index)]
    if config.protocol == "sfl" and config.server.mode == "sequential":
        return [[u] for u in participants]
    return [participants]


def predict(config: RunConfig, model_config: PretrainedConfig) -> Prediction:
    """Predicted ``sim_s`` of every round of a run of ``config`` (every device takes part)."""
    cuts = resolve_cuts(config, model_config)
    clock = Clock(config, model_config, cuts)
    everyone = list(range(config.devices.count))
    ranks = [config.device_rank(u) for u in everyone]
    global_rank = max(ranks)
    slots = 1 if config.protocol == "sfl" else len(everyone)
    spec = config.compression.adapters
    download, upload = {}, {}
    for u in everyone:
        layers = range(cuts[u])
        download[(u, "adapter_download")] = adapter_message_bytes(
            clock.costs, layers, global_rank, spec, False, exact=True)
        upload[(u, "adapter_upload")] = adapter_message_bytes(clock.costs, layers, ranks[u], spec, True, u, exact=True)
    round_s, first_order, step_index = [], [], 0
    for round_index in range(config.train.rounds):
        clock.begin_round(round_index, everyone)
        clock.transfer(download, "down")
        sent = {(u, kind): size for u in everyone for kind, size in clock.step_bytes(u).items()}
        for _ in range(config.train.local_steps):
            groups = serving_groups(config, clock, everyone, step_index)
            first_order = first_order or [u for group in groups for u in group]
            clock.split_step(groups, sent, slots < len(groups), global_rank if slots == 1 else None)
            step_index += 1
        clock.transfer(upload, "up")
        round_s.append(clock.round_s)
    train = config.train
    memory = [device_memory_bytes(clock.costs, c, r, train.batch_size, train.seq_len) for c, r in zip(cuts, ranks)]
    server = predicted_memory(config, model_config, cuts)["peak_mem_server_bytes"]
    return Prediction(round_s, first_order, memory, server)

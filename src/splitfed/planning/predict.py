"""Predict a run's simulated time by replaying its rounds through the simulated clock.

The clock is the one every run uses, on the topology the run's protocol declares; what a run
learns only at run time (the bytes of each message) is predicted from the wire format
(``system.traffic``), and the server side's groups and serving order come from the protocol's
own ``groups``. So a plan's prediction and the run's ``sim_s`` differ only by what the byte
prediction misses (zstd on real data, a few digits).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from splitfed.config import RunConfig
from splitfed.models.families import num_layers
from splitfed.registry import protocol_class
from splitfed.system.clock import Clock
from splitfed.system.costs import LayerCosts, stage_memory
from splitfed.system.traffic import adapter_message_bytes, step_bytes
from splitfed.topology import Hop, Topology, groups_share_slots

"""Route that adapter traffic of a slot shared by several routes is counted for (as the links do)."""

Sent = dict[tuple[int, str, str], int]
"""Bytes per (route, hop name, message kind), as the links count them for the clock."""


@dataclass(frozen=True)
class Prediction:
    """What a run of a config would record: ``sim_s`` per round, and the predicted peak memory."""

    round_s: list[float]
    first_order: list[int]
    device_memory_bytes: list[int]
    server_memory_bytes: int


def adapter_traffic(config: RunConfig, topology: Topology, costs: LayerCosts) -> tuple[Sent, Sent]:
    """Predicted adapter downloads and uploads of a round: every slot whose worker is across a
    network from the aggregator gets its layers of the global adapter (at the largest rank) and
    sends back its own; the adapters' codec applies on a route's access link only."""
    global_rank = max(s.rank for route in topology.routes for s in route.stages)
    download: Sent = {}
    upload: Sent = {}
    for worker, stages in topology.workers().items():
        down_hop = Hop(topology.aggregator, worker)
        if not topology.crosses_network(down_hop):
            continue
        for stage in stages:
            owner = topology.owner(stage.key)
            spec = config.compression.adapters if topology.coded(down_hop, owner) else "none"
            download[(owner, down_hop.name, "adapter_download")] = adapter_message_bytes(
                costs, stage.layers, global_rank, spec, False, exact=True)
            upload[(owner, down_hop.reverse().name, "adapter_upload")] = adapter_message_bytes(
                costs, stage.layers, stage.rank, spec, True, max(owner, 0), exact=True)
    return download, upload


def step_traffic(config: RunConfig, clock: Clock, topology: Topology) -> Sent:
    """Predicted bytes of one split step on every hop that crosses a network: on a route's access
    hop the encoded (compressed) messages, on hops between server-side workers the plain ones."""
    train = config.train
    sent: Sent = {}
    for route in topology.routes:
        u = route.device
        for k, hop in enumerate(route.hops):
            if not topology.crosses_network(hop):
                continue
            sizes = clock.step_bytes(u) if k == 0 else step_bytes(clock.costs, u, train.batch_size, train.seq_len)
            back = hop.reverse().name
            sent[(u, hop.name, "activations")] = sizes["activations"]
            sent[(u, back, "activation_grad")] = sizes["activation_grad"]
            if k == 0:
                sent[(u, hop.name, "grad_norm")] = sizes["grad_norm"]
                sent[(u, back, "clip_scale")] = sizes["clip_scale"]
    return sent


def predict(config: RunConfig, model_config: PretrainedConfig) -> Prediction:
    """Predicted ``sim_s`` of every round of a run of ``config`` (every device takes part)."""
    cls = protocol_class(config.protocol)
    cuts = cls.resolve_cuts(config, model_config)
    topology = cls.topology(config, cuts, num_layers(model_config))
    clock = Clock(config, model_config, topology)
    everyone = [route.device for route in topology.routes]
    download, upload = adapter_traffic(config, topology, clock.costs)
    slots = topology.server_side_slots()
    round_s, first_order, step_index = [], [], 0
    for round_index in range(config.train.rounds):
        clock.begin_round(round_index, everyone)
        clock.transfer(download)
        sent = step_traffic(config, clock, topology) if cls.split else {}
        for _ in range(config.train.local_steps):
            if cls.split:
                groups = cls.groups(config, clock, everyone, step_index)
                first_order = first_order or [u for group in groups for u in group]
                clock.split_step(groups, sent, groups_share_slots(slots, groups))
            else:
                clock.local_step(everyone)
            step_index += 1
        clock.transfer(upload)
        round_s.append(clock.round_s)
    train = config.train
    memory = [
        int(stage_memory(clock.costs, r.first.end - r.first.start, r.first.rank, train.batch_size, train.seq_len,
                         True, r.first.last).total)
        for r in topology.routes
    ]
    server = cls.predicted_memory(config, model_config, cuts)["peak_mem_server_bytes"]
    return Prediction(round_s, first_order, memory, server)

"""SplitLLM: hierarchical split learning, user -> edge -> cloud.

The model and its LoRA are split in three. User u holds layers [0, cut_u) (its cut from
``devices.cuts`` or its memory budget, as in memsfl), its edge server the layers
[cut_u, cloud_cut), the cloud the rest. Users are attached to edges (``edge_of``, else
round-robin). Each round every edge trains with ONE of its users (the pairing rotates over
the rounds, so every user trains once per ``ceil(users per edge)`` rounds), ``local_steps``
steps per pairing; the edges run in parallel and the cloud serves their batches together.
The loss is computed at the cloud; gradients go back cloud -> edge -> user; clipping uses
the norm over all three stages. The cloud keeps one LoRA for all edges (``cloud_lora =
"shared"``) or one per edge (``"per_edge"``). At round end user-side and edge-side LoRA
go to the cloud and are aggregated layer by layer with ``aggregation.method``.

An edge keeps one LoRA per user cut it serves (users of one edge with the same cut share
it); each edge and the cloud run on their own machine.

    [splitllm]
    edges = 2
    cloud_cut = 20        # 0: halfway between the deepest user cut and the last layer
    edge_of = []          # edge of each user; empty: user u on edge u % edges
    order = "rotate"      # or "random": a fresh seeded order of each edge's users per cycle
    cloud_lora = "shared" # or "per_edge"
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from splitfed.config import ProtocolOptions, RunConfig
from splitfed.protocols.split import SplitProtocol
from splitfed.registry import register
from splitfed.seeding import Purpose, derive_seed
from splitfed.topology import Route, StagePlacement, Topology


class SplitllmOptions(ProtocolOptions):
    edges: int = Field(2, ge=1)
    """Edge servers (E); every one needs at least one user."""
    cloud_cut: int = Field(0, ge=0)
    """First layer of the cloud; users and edges hold the layers below. 0: halfway between the deepest
    user cut and the last layer."""
    edge_of: list[int] = []
    """The edge of each user (one entry per user); empty: user u is on edge u % edges."""
    order: Literal["rotate", "random"] = "rotate"
    """Which user each edge trains with in a round: in turn, or in a seeded random order per cycle."""
    cloud_lora: Literal["shared", "per_edge"] = "shared"
    """One cloud-side LoRA trained on every edge's batches, or one per edge."""


def edge_of(config: RunConfig, user: int) -> int:
    assignment = config.options.edge_of
    return assignment[user] if assignment else user % config.options.edges


def users_of(config: RunConfig, edge: int) -> list[int]:
    return [u for u in range(config.devices.count) if edge_of(config, u) == edge]


def cloud_cut(config: RunConfig, cuts: list[int], total_layers: int) -> int:
    return config.options.cloud_cut or (max(cuts) + total_layers) // 2


@register
class SplitLLM(SplitProtocol):
    name = "splitllm"
    Options = SplitllmOptions

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        super().check_config(config)
        options, count = config.options, config.devices.count
        if options.edge_of and len(options.edge_of) != count:
            raise ValueError(f"splitllm.edge_of has {len(options.edge_of)} entries; it needs one per user "
                             f"(devices.count={count})")
        bad = [e for e in options.edge_of if not 0 <= e < options.edges]
        if bad:
            raise ValueError(f"splitllm.edge_of names edges {bad}; allowed: 0..{options.edges - 1} (splitllm.edges)")
        idle = [e for e in range(options.edges) if not users_of(config, e)]
        if idle:
            raise ValueError(f"splitllm: edges {idle} have no user (devices.count={count}, splitllm.edges="
                             f"{options.edges}, splitllm.edge_of={options.edge_of})")
        if config.train.devices_per_round:
            raise ValueError("splitllm pairs each edge with one of its users per round; train.devices_per_round "
                             "must be 0")
        if options.cloud_cut and config.devices.cuts and max(config.devices.cuts) >= options.cloud_cut:
            raise ValueError(f"splitllm.cloud_cut={options.cloud_cut} must be above every user cut "
                             f"(devices.cuts={config.devices.cuts})")

    @classmethod
    def topology(cls, config: RunConfig, cuts: list[int], total_layers: int) -> Topology:
        top = cloud_cut(config, cuts, total_layers)
        if not max(cuts) < top < total_layers:
            raise ValueError(f"splitllm.cloud_cut={top} must lie above every user cut (deepest {max(cuts)}) and "
                             f"below the model's {total_layers} layers")
        rank = max(config.device_rank(u) for u in range(config.devices.count))
        shared = config.options.cloud_lora == "shared"
        routes = []
        for u, cut in enumerate(cuts):
            edge = f"edge{edge_of(config, u)}"
            routes.append(Route(u, (
                StagePlacement(f"user{u}", "device", 0, cut, True, False, f"user{u}", config.device_rank(u)),
                StagePlacement(edge, "edge", cut, top, False, False, f"cut{cut}", rank),
                StagePlacement("cloud", "cloud", top, total_layers, False, True, "cloud" if shared else edge, rank),
            )))
        return Topology(tuple(routes), aggregator="cloud")

    @classmethod
    def routes_per_round(cls, config: RunConfig) -> int:
        return config.options.edges

    def participants(self, round_index: int) -> list[int]:
        """One user per edge: each edge's users in turn (or in a seeded random order per cycle)."""
        chosen = []
        for edge in range(self.config.options.edges):
            users = users_of(self.config, edge)
            cycle, position = divmod(round_index, len(users))
            if self.config.options.order == "random":
                rng = np.random.default_rng(derive_seed(self.config.seed, Purpose.PARTICIPANTS, cycle, edge))
                users = [int(u) for u in rng.permutation(users)]
            chosen.append(users[position])
        return sorted(chosen)

"""Routes of stages over hops: the topology a protocol declares, and everything derived from it.

A *route* is the chain of stages one device's batch passes through, for example
``device3 [0, 4) -> server [4, 30)`` or ``user0 [0, 2) -> edge1 [2, 10) -> cloud [10, 30)``.
Each stage runs on a *worker* (a role that owns one base model) in an adapter *slot*; routes
that name the same (worker, slot) train the same LoRA. Checkpoints, the memory report, the
simulated clock, the planner's predictions and process hosting read this declaration; none
of them needs to know which protocol produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

NO_ROUTE = -1
"""Route of traffic that belongs to no single route (an adapter slot that several routes share)."""


@dataclass(frozen=True)
class StagePlacement:
    """One stage of a route: layers ``[start, end)`` on ``worker`` in adapter ``slot``."""

    worker: str
    """Role name, e.g. ``device3`` or ``server``."""
    tier: str
    """What kind of machine runs it (``device``, ``server``): picks its compute profile and memory key."""
    start: int
    end: int
    first: bool
    """Owns the embeddings and the data."""
    last: bool
    """Owns the final norm, the LM head and the loss."""
    slot: str
    """Adapter slot at ``worker``; routes naming the same slot share its LoRA."""
    rank: int
    base: str = ""
    """Which copy of the base weights the slot runs on; slots of one worker with the same ``base``
    share one frozen model ("" = the worker's own base). Copies cost memory (SplitFed-V1)."""
    placement: tuple[tuple[int, str, int], ...] = ()
    """(layer, module path in the layer, rank) of each matrix with LoRA when they differ per matrix
    (HSplitLoRA, ``adapters.layout``); empty: every target of every layer at ``rank``."""

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    @property
    def key(self) -> tuple[str, str]:
        """(worker, slot): the identity of the LoRA this stage trains."""
        return self.worker, self.slot


@dataclass(frozen=True)
class Hop:
    """A directed link between two workers (``src`` sends, ``dst`` receives)."""

    src: str
    dst: str

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"

    def reverse(self) -> Hop:
        return Hop(self.dst, self.src)


@dataclass(frozen=True)
class Route:
    """The stages device ``device``'s batches pass, first to last."""

    device: int
    stages: tuple[StagePlacement, ...]

    @property
    def first(self) -> StagePlacement:
        return self.stages[0]

    @property
    def hops(self) -> list[Hop]:
        """The forward hops (stage k -> stage k + 1); gradients travel them in reverse."""
        return [Hop(a.worker, b.worker) for a, b in zip(self.stages, self.stages[1:])]


@dataclass(frozen=True)
class Topology:
    """Every device's route, and where the aggregator lives."""

    routes: tuple[Route, ...]
    """Indexed by device."""
    aggregator: str
    """Worker co-located with the aggregator: its slots' adapters need no network transfer."""
    hosts: dict[str, str] | None = None
    """Machine of each worker (workers on one machine exchange messages without a network);
    None: every worker is its own machine."""

    def host(self, worker: str) -> str:
        return (self.hosts or {}).get(worker, worker)

    def crosses_network(self, hop: Hop) -> bool:
        return self.host(hop.src) != self.host(hop.dst)

    @cached_property
    def _slots(self) -> dict[str, dict[str, StagePlacement]]:
        found: dict[str, dict[str, StagePlacement]] = {}
        for route in self.routes:
            for stage in route.stages:
                found.setdefault(stage.worker, {}).setdefault(stage.slot, stage)
        return found

    @cached_property
    def _routes_by_slot(self) -> dict[tuple[str, str], list[int]]:
        found: dict[tuple[str, str], list[int]] = {}
        for route in self.routes:
            for stage in route.stages:
                found.setdefault(stage.key, []).append(route.device)
        return found

    def workers(self) -> dict[str, list[StagePlacement]]:
        """Each worker's distinct slots (first declaration of each), in route order."""
        return {worker: list(slots.values()) for worker, slots in self._slots.items()}

    def tier_of(self, worker: str) -> str:
        return next(iter(self._slots[worker].values())).tier

    def routes_of(self, key: tuple[str, str]) -> list[int]:
        """Devices whose route passes the slot ``key`` = (worker, slot)."""
        return self._routes_by_slot.get(key, [])

    def owner(self, key: tuple[str, str]) -> int:
        """The route a slot's adapter traffic is counted for: its one route's, else ``NO_ROUTE``."""
        routes = self.routes_of(key)
        return routes[0] if len(routes) == 1 else NO_ROUTE

    def coded(self, hop: Hop, route: int) -> bool:
        """Whether ``hop`` carries ``route``'s traffic through the codecs: only a device's own hops do."""
        return route != NO_ROUTE and self.routes[route].first.worker in (hop.src, hop.dst)

    def depth(self) -> int:
        """Most stages on any route."""
        return max(len(r.stages) for r in self.routes)

    def server_side_slots(self) -> tuple[frozenset[tuple[str, str]], ...]:
        """Per route: the (worker, slot) keys of its stages after the first (computed once: every split
        step asks, and the routes never change)."""
        return self._server_side_slots

    @cached_property
    def _server_side_slots(self) -> tuple[frozenset[tuple[str, str]], ...]:
        return tuple(frozenset(s.key for s in route.stages[1:]) for route in self.routes)


def groups_share_slots(slots: tuple[frozenset[tuple[str, str]], ...], groups: list[list[int]]) -> bool:
    """Whether consecutive groups train a common server-side slot (``slots``: per route, from
    ``Topology.server_side_slots``): the next group then waits for that slot's step."""
    keys = [frozenset().union(*(slots[u] for u in group)) for group in groups]
    return any(a & b for a, b in zip(keys, keys[1:]))


EDGE_TIER = "edge"
"""Workers of this tier run in processes of their own (``splitfed edge``) that relay their users' traffic."""


def edge_peers(topology: Topology) -> dict[tuple[str, str], int]:
    """The stream (peer id) of each slot of each edge worker: numbered after the devices' ids."""
    keys = sorted({s.key for r in topology.routes for s in r.stages if s.tier == EDGE_TIER})
    return {key: len(topology.routes) + i for i, key in enumerate(keys)}


def edge_index(worker: str) -> int:
    """``edge3`` -> 3."""
    return int(worker.removeprefix(EDGE_TIER))

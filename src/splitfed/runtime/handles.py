"""Handles of workers: what a protocol calls. Every request returns a ``Reply``.

``LocalWorker`` runs a worker of this process (requests run when made); ``runtime.remote``
has the same interface for a worker in another process. ``Network`` carries the messages a
protocol passes between workers over their hops (and counts their bytes) when both ends are
here and on different machines; a remote handle's transport carries and counts its own.
"""

from __future__ import annotations

from typing import Protocol

import torch

from splitfed.adapters.layout import AdapterLayout

from splitfed.roles.worker import Arrivals, StageWorker
from splitfed.runtime.futures import Reply, run_now
from splitfed.runtime.inproc import InProcessLink
from splitfed.topology import Hop, Topology
from splitfed.wire.messages import Message


class WorkerHandle(Protocol):
    """What protocols may ask of a worker, wherever it runs."""

    name: str

    def forward(self, slot: str, round_index: int, step: int) -> Reply[Message]: ...
    def backward(self, slot: str, message: Message) -> Reply[Message]: ...
    def apply(self, slot: str, message: Message, lr: float) -> Reply[None]: ...
    def local_step(self, slot: str, lr: float) -> Reply[tuple[float, int]]: ...
    def upload(self, slot: str, round_index: int) -> Reply[Message]: ...
    def download(self, slot: str, message: Message) -> Reply[None]: ...
    def merge(self, slot: str, message: Message) -> Reply[None]: ...
    def measure_importance(self, slot: str, targets: list[str], passes: int) -> Reply[None]: ...
    def importance(self, slot: str, round_index: int) -> Reply[Message]: ...
    def relayout(self, slot: str, layout: AdapterLayout) -> Reply[None]: ...
    def forward_group(self, groups: dict[str, Arrivals]) -> Reply[dict[int, Message]]: ...
    def backward_group(self, groups: dict[str, Arrivals]) -> Reply[dict[int, Message]]: ...
    def sq_norm(self, slot: str) -> float: ...
    def discard(self, slot: str) -> None: ...
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]: ...
    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...
    def peak_bytes(self) -> int: ...
    @property
    def trainable_params(self) -> int: ...


class LocalWorker:
    """A worker of this process behind the handle interface."""

    def __init__(self, worker: StageWorker) -> None:
        self.worker = worker
        self.name = worker.name

    def forward(self, slot: str, round_index: int, step: int) -> Reply[Message]:
        return run_now(lambda: self.worker.forward(slot, round_index, step))

    def backward(self, slot: str, message: Message) -> Reply[Message]:
        return run_now(lambda: self.worker.backward(slot, message))

    def apply(self, slot: str, message: Message, lr: float) -> Reply[None]:
        return run_now(lambda: self.worker.apply(slot, float(message.values["scale"]), lr))

    def local_step(self, slot: str, lr: float) -> Reply[tuple[float, int]]:
        return run_now(lambda: self.worker.local_step(slot, lr))

    def upload(self, slot: str, round_index: int) -> Reply[Message]:
        return run_now(lambda: self.worker.upload(slot, round_index))

    def download(self, slot: str, message: Message) -> Reply[None]:
        return run_now(lambda: self.worker.download(slot, message))

    def merge(self, slot: str, message: Message) -> Reply[None]:
        return run_now(lambda: self.worker.merge(slot, message))

    def measure_importance(self, slot: str, targets: list[str], passes: int) -> Reply[None]:
        return run_now(lambda: self.worker.measure_importance(slot, targets, passes))

    def importance(self, slot: str, round_index: int) -> Reply[Message]:
        return run_now(lambda: self.worker.importance(slot, round_index))

    def relayout(self, slot: str, layout: AdapterLayout) -> Reply[None]:
        return run_now(lambda: self.worker.relayout(slot, layout))

    def forward_group(self, groups: dict[str, Arrivals]) -> Reply[dict[int, Message]]:
        return run_now(lambda: self.worker.forward_group(groups))

    def backward_group(self, groups: dict[str, Arrivals]) -> Reply[dict[int, Message]]:
        return run_now(lambda: self.worker.backward_group(groups))

    def sq_norm(self, slot: str) -> float:
        return self.worker.sq_norm(slot)

    def discard(self, slot: str) -> None:
        self.worker.discard(slot)

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.worker.export_state()

    def import_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.worker.import_state(tensors, meta)

    def peak_bytes(self) -> int:
        return self.worker.peak_bytes()

    @property
    def trainable_params(self) -> int:
        return self.worker.trainable_params


class Network:
    """Carries messages between the workers of a run over their hops."""

    def __init__(self, topology: Topology, link: InProcessLink, remote: set[str]) -> None:
        self.topology = topology
        self.link = link
        self.remote = remote

    def carry(self, hop: Hop, route: int, direction: str, message: Message) -> Message:
        """Deliver ``message`` over ``hop`` (``direction``: ``up`` toward the aggregator and the
        route's last stage, else ``down``); bytes count when the hop crosses a network."""
        if hop.src in self.remote or hop.dst in self.remote or not self.topology.crosses_network(hop):
            return message  # a remote handle's transport carries it; or both ends share a machine
        return self.link.carry(hop, route, direction, message, self.topology.coded(hop, route))

"""Byte counters per hop, and the codec every link packs and unpacks with.

Messages are addressed by hop (from worker, to worker) and by the route whose traffic they
carry. The in-process link (``runtime.inproc``) and the handles of remote workers
(``runtime.remote``) both count into one ``ByteCounts``; protocols never see transports.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from splitfed.config import RunConfig
from splitfed.seeding import Purpose, derive_seed
from splitfed.topology import Hop
from splitfed.wire.compression import MessageCodec

CONTROL_KINDS = ("call", "ack", "role_state", "error")
"""Requests and acknowledgements of the remote runtimes: counted in the byte totals, not timed."""

class ByteCounts:
    """Bytes on the wire.

    ``total_up`` / ``total_down`` only grow ("up" is toward the route's last stage and the
    aggregator). Per-route counts (and per hop, for step records of multi-hop routes) are
    taken and reset by whoever writes a step record; bytes per (route, hop, message kind) by
    the simulated clock (``take_sent``). Control traffic (``CONTROL_KINDS``) counts in the
    totals and per-route counts only.
    """

    def __init__(self) -> None:
        self.total_up = 0
        self.total_down = 0
        self._up: dict[int, int] = defaultdict(int)
        self._down: dict[int, int] = defaultdict(int)
        self._hops: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._sent: dict[tuple[int, str, str], int] = defaultdict(int)
        self.total_by_kind: dict[str, int] = defaultdict(int)
        """Bytes per message kind since the start (both directions); only grows."""

    def record(self, hop: Hop, route: int, nbytes: int, direction: str, kind: str | None = None) -> None:
        if direction == "up":
            self.total_up += nbytes
            self._up[route] += nbytes
        else:
            self.total_down += nbytes
            self._down[route] += nbytes
        self._hops[route][hop.name] += nbytes
        self.total_by_kind[kind or "other"] += nbytes
        if kind is not None and kind not in CONTROL_KINDS:
            self._sent[(route, hop.name, kind)] += nbytes

    def take_counts(self, route: int) -> tuple[int, int, dict[str, int]]:
        """Bytes (up, down, per hop) of ``route`` since the last call, then reset them."""
        hops = dict(self._hops.pop(route, {}))
        return self._up.pop(route, 0), self._down.pop(route, 0), hops

    def take_sent(self) -> dict[tuple[int, str, str], int]:
        """Bytes per (route, hop name, message kind) since the last call, then reset them."""
        sent, self._sent = dict(self._sent), defaultdict(int)
        return sent

    def clear_pending(self) -> None:
        """Forget per-route counts (e.g. adapter traffic that belongs to no step)."""
        self._up.clear()
        self._down.clear()
        self._hops.clear()


class Link(ByteCounts):
    """Byte counters plus the codec that packs and unpacks compressed tensors on this side.

    Codecs apply on a route's first hop (the device's access link); hops between server-side
    workers are wired and carry messages as they are.
    """

    def __init__(self, codec: MessageCodec) -> None:
        super().__init__()
        self.codec = codec

    def take_stats(self) -> dict[str, float | int | None]:
        """Compression statistics per stream since the last call (see ``MessageCodec.take_stats``)."""
        return self.codec.take_stats()

    def export_state(self) -> dict[str, torch.Tensor]:
        """Error-feedback residuals of the streams this side sends (for checkpoints)."""
        return self.codec.export_state()

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.codec.import_state(tensors)


def message_codec(config: RunConfig) -> MessageCodec:
    """The codec of a run's links; every process of a run derives the same one from the config."""
    return MessageCodec(config.compression, derive_seed(config.seed, Purpose.CODEC), config.compute.torch_dtype)

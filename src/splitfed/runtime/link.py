"""What every link between the server side and devices has: byte counters and the message codec.

The in-process link (``runtime.inproc``) and the server's link to remote devices
(``runtime.remote``) both derive from ``Link``; protocols see only this interface.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from splitfed.config import RunConfig
from splitfed.seeding import derive_seed
from splitfed.wire.compression import MessageCodec
from splitfed.wire.messages import Message

CONTROL_KINDS = ("call", "ack", "role_state", "error")
"""Requests and acknowledgements of the remote runtimes: counted in the byte totals, not timed."""


class ByteCounts:
    """Bytes on the wire.

    ``total_up`` / ``total_down`` only grow; per-device counts are taken (and reset) by
    whoever writes a per-step record; bytes per (device, message kind) by the simulated
    clock (``take_sent``). Control traffic (``CONTROL_KINDS``: requests, acknowledgements)
    counts in the totals and per-device counts only.
    """

    def __init__(self) -> None:
        self.total_up = 0
        self.total_down = 0
        self._up: dict[int, int] = defaultdict(int)
        self._down: dict[int, int] = defaultdict(int)
        self._sent: dict[tuple[int, str], int] = defaultdict(int)

    def record(self, device: int, up: int = 0, down: int = 0, kind: str | None = None) -> None:
        self.total_up, self.total_down = self.total_up + up, self.total_down + down
        self._up[device] += up
        self._down[device] += down
        if kind is not None and kind not in CONTROL_KINDS:
            self._sent[(device, kind)] += up + down

    def take_counts(self, device: int) -> tuple[int, int]:
        """Bytes (up, down) of ``device`` since the last call, then reset them."""
        return self._up.pop(device, 0), self._down.pop(device, 0)

    def take_sent(self) -> dict[tuple[int, str], int]:
        """Bytes per (device, message kind) since the last call, then reset them."""
        sent, self._sent = dict(self._sent), defaultdict(int)
        return sent

    def clear_pending(self) -> None:
        """Forget per-device counts (e.g. adapter traffic that belongs to no step)."""
        self._up.clear()
        self._down.clear()


class Link(ByteCounts):
    """Byte counters plus the codec that packs and unpacks compressed tensors on this side."""

    def __init__(self, codec: MessageCodec) -> None:
        super().__init__()
        self.codec = codec

    def up(self, device: int, message: Message) -> Message:
        """Deliver a message from ``device`` to the server side."""
        raise NotImplementedError

    def down(self, device: int, message: Message) -> Message:
        """Deliver a message from the server side to ``device``."""
        raise NotImplementedError

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
    return MessageCodec(config.compression, derive_seed(config.seed, 3))

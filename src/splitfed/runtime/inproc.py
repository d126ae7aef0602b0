"""In-process runtime: delivers messages between roles in one process, deterministically.

Every message is encoded to bytes and decoded again exactly as a network runtime would,
so the byte counters are the real encoded sizes and roles never share tensor objects.
"""

from __future__ import annotations

from collections import defaultdict

from splitfed.wire.messages import Message, decode, encode


class InProcessLink:
    """Carries messages up (device -> server) and down (server -> device) and counts bytes.

    ``total_up`` / ``total_down`` only grow; the per-device counters are taken (and reset)
    by whoever writes a per-step record.
    """

    def __init__(self) -> None:
        self.total_up = 0
        self.total_down = 0
        self._up: dict[int, int] = defaultdict(int)
        self._down: dict[int, int] = defaultdict(int)

    def up(self, device: int, message: Message) -> Message:
        data = encode(message)
        self.total_up += len(data)
        self._up[device] += len(data)
        return decode(data)

    def down(self, device: int, message: Message) -> Message:
        data = encode(message)
        self.total_down += len(data)
        self._down[device] += len(data)
        return decode(data)

    def take_counts(self, device: int) -> tuple[int, int]:
        """Bytes (up, down) of ``device`` since the last call, then reset them."""
        return self._up.pop(device, 0), self._down.pop(device, 0)

    def clear_pending(self) -> None:
        """Forget per-device counts (e.g. adapter traffic that belongs to no step)."""
        self._up.clear()
        self._down.clear()

"""In-process runtime: delivers messages between roles in one process, deterministically.

Every message is packed by the codecs of ``compression.*`` (``wire.compression``), encoded
to bytes and decoded again exactly as a network runtime would, so the byte counters are
the real encoded sizes and roles never share tensor objects. Roles never see codecs.
"""

from __future__ import annotations

from splitfed.runtime.link import Link
from splitfed.wire.messages import Message, decode, encode


class InProcessLink(Link):
    """Carries messages up (device -> server) and down (server -> device), compresses and counts bytes."""

    def up(self, device: int, message: Message) -> Message:
        return self._deliver("up", device, message)

    def down(self, device: int, message: Message) -> Message:
        return self._deliver("down", device, message)

    def _deliver(self, direction: str, device: int, message: Message) -> Message:
        data = encode(self.codec.pack(direction, device, message))
        self.record(device, **{direction: len(data)}, kind=message.kind)
        received = decode(data)
        delivered = self.codec.unpack(device, received)
        self.codec.tally(received, len(data))
        return delivered

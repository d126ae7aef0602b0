"""In-process runtime: delivers messages between workers of one process, deterministically.

Every message that crosses a hop between two machines is packed by the codecs of
``compression.*`` (on a device's access hop), encoded to bytes and decoded again exactly as a
network runtime would, so the byte counters are the real encoded sizes and workers never
share tensor objects. Workers never see codecs.
"""

from __future__ import annotations

from splitfed.runtime.link import Link
from splitfed.topology import Hop
from splitfed.wire.messages import Message, decode, encode


class InProcessLink(Link):
    """Carries messages over hops between workers of this process, compresses and counts bytes."""

    def carry(self, hop: Hop, route: int, direction: str, message: Message, coded: bool) -> Message:
        """Deliver ``message`` over ``hop`` for ``route``; ``coded``: the hop uses the route's codecs."""
        if not coded:
            data = encode(message)
            self.record(hop, route, len(data), direction, message.kind)
            return decode(data)
        data = encode(self.codec.pack(direction, route, message))
        self.record(hop, route, len(data), direction, message.kind)
        received = decode(data)
        delivered = self.codec.unpack(route, received)
        self.codec.tally(received, len(data))
        return delivered

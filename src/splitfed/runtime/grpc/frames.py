"""Chunking of encoded messages into gRPC frames, and their checked reassembly.

A message's bytes travel as frames of at most ``chunk_size`` bytes, each with a 24-byte
header: message id (u64), the id of the request it answers (u64, 0 for a request), chunk
index (u32), chunk count (u32). The reply id lets the server match every reply to its
request: a message that answers nothing outstanding is refused, whatever it contains. The receiver rebuilds a
message only from a complete, in-order run of chunks, and refuses anything that would
exceed its size limit, so a hostile peer cannot make it buffer without bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<QQII")
DEFAULT_CHUNK = 1 << 20  # 1 MiB per frame


class FrameError(ValueError):
    """A frame that is malformed, out of order, or would exceed the size limit."""


def split_frames(message_id: int, data: bytes, chunk_size: int = DEFAULT_CHUNK, reply_to: int = 0) -> list[bytes]:
    count = max(1, -(-len(data) // chunk_size))
    return [HEADER.pack(message_id, reply_to, i, count) + data[i * chunk_size : (i + 1) * chunk_size]
            for i in range(count)]


@dataclass(frozen=True)
class Assembled:
    """A whole message's bytes with the ids its frames carried."""

    data: bytes
    message_id: int
    reply_to: int


class Reassembler:
    """Feeds frames in arrival order; returns a whole message's bytes when its last chunk arrives."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._id: int | None = None
        self._reply_to = 0
        self._expected = 0
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, frame: bytes) -> Assembled | None:
        if len(frame) < HEADER.size:
            self._reset()
            raise FrameError(f"frame of {len(frame)} bytes is shorter than its {HEADER.size}-byte header")
        message_id, reply_to, index, count = HEADER.unpack_from(frame)
        if count == 0 or index >= count:
            self._reset()
            raise FrameError(f"frame {index} of {count} is not a valid chunk index")
        if index == 0:
            self._reset()
            self._id, self._reply_to, self._expected = message_id, reply_to, count
        elif message_id != self._id or reply_to != self._reply_to or index != len(self._chunks):
            self._reset()
            raise FrameError(f"frame {index} of message {message_id} arrived out of order")
        self._size += len(frame) - HEADER.size
        if self._size > self.max_message_bytes:
            self._reset()
            raise FrameError(f"message exceeds the size limit of {self.max_message_bytes} bytes")
        self._chunks.append(frame[HEADER.size :])
        if len(self._chunks) < self._expected:
            return None
        assembled = Assembled(b"".join(self._chunks), message_id, reply_to)
        self._reset()
        return assembled

    def _reset(self) -> None:
        self._id, self._reply_to, self._expected, self._chunks, self._size = None, 0, 0, [], 0

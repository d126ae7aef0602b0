"""An authenticated attacker on a real gRPC stream, for the hardening and fuzz tests.

``AttackerDevice`` holds a real device's worker (``deploy.host_devices``) and answers the
server's requests exactly as a device process would, except where ``tamper`` rewrites a
reply; ``inject`` puts any bytes on the stream as a message of its own. It runs in the test
process, so a test can count every error the server answers with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from splitfed.config import RunConfig
from splitfed.deploy import host_devices, transport_settings
from splitfed.runtime.endpoint import respond, wants_stop
from splitfed.runtime.grpc.frames import split_frames
from splitfed.runtime.grpc.transport import connect
from splitfed.runtime.link import message_codec
from splitfed.wire.messages import Message, encode

Tamper = Callable[[Message, Message], Message | bytes | None]
"""(request, honest reply) -> the reply to send instead (a Message, raw bytes) or None for the honest one."""


class AttackerDevice:
    def __init__(self, config: RunConfig, device: int, tamper: Tamper | None = None) -> None:
        self.hosted = host_devices(config, [device])[device]
        self.codec = message_codec(config)
        self.settings = transport_settings(config.runtime)
        self.dial = lambda: connect(config.runtime.address, device, config.runtime.tokens[device], self.settings,
                                    ready_timeout_s=120)
        self.tamper = tamper
        self.errors: list[str] = []
        """Reasons of the error messages the server sent back."""
        self.requests = 0
        self.answered: list[int] = []
        """Ids of the requests answered so far (a replay naming one is stale)."""
        self.stopped = threading.Event()
        self._ids = iter(range(10**9, 2 * 10**9))

    def start(self) -> AttackerDevice:
        """Dial the server and serve its requests on a thread."""
        self.session = self.dial()
        threading.Thread(target=self._serve, daemon=True, name="attacker").start()
        return self

    def _serve(self) -> None:
        try:
            while True:
                try:
                    request, _, request_id = self.session.receive(timeout=None)
                except ConnectionError:
                    return
                if request.kind == "error":
                    self.errors.append(str(request.values.get("reason")))
                    continue
                if wants_stop(self.hosted, request, self.codec):
                    return
                self.requests += 1
                reply = respond(self.hosted, request, self.codec)
                if reply is None:
                    continue
                if self.tamper is not None:
                    reply = self.tamper(request, reply) or reply
                data = reply if isinstance(reply, bytes) else encode(reply)
                self.inject(data, reply_to=request_id)
                self.answered.append(request_id)
        finally:
            self.stopped.set()

    def inject(self, payload: bytes, reply_to: int = 0) -> None:
        """Put ``payload`` on the stream as one message (answering ``reply_to``; 0: answering nothing)."""
        for frame in split_frames(next(self._ids), payload, self.settings.chunk_size, reply_to):
            self.session._outbox.put(frame)

    def inject_frame(self, frame: bytes) -> None:
        """Put one raw frame on the stream (a frame-level attack)."""
        self.session._outbox.put(frame)

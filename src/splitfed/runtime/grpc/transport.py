"""gRPC transport: one bidirectional stream per device, carrying encoded messages as frames.

Devices dial the server (they may sit behind NAT); the server drives the protocol by
sending requests down each device's stream and reading the replies. Payloads are the
project's own message encoding (safetensors + JSON header), chunked into frames; gRPC
sees only bytes, so no protobuf code generation and no pickle is involved.

Security: a device presents its id and token in the call metadata (checked in constant
time against the configured tokens) and, optionally, a client certificate (mutual TLS).
Unknown ids and wrong tokens are refused before any payload is read; every payload is
size-limited, decoded and checked before use (see ``splitfed.wire.validate``).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitfed.runtime.grpc.frames import DEFAULT_CHUNK, FrameError, Reassembler, split_frames
from splitfed.runtime.remote import DeviceLost
from splitfed.wire.messages import Message, MessageError, decode, encode

log = logging.getLogger("splitfed.grpc")

METHOD = "/splitfed.Link/Session"
DEVICE_KEY, TOKEN_KEY = "splitfed-device", "splitfed-token"


@dataclass(frozen=True)
class TransportSettings:
    max_message_bytes: int = 256 << 20
    chunk_size: int = DEFAULT_CHUNK
    keepalive_ms: int = 10_000
    tls_cert: Path | None = None
    """Server certificate (PEM); with tls_key, the server speaks TLS."""
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """CA that signs device certificates; when set, devices must present one (mutual TLS)."""

    def channel_options(self) -> list[tuple[str, int]]:
        frame_limit = self.chunk_size + 1024
        return [
            ("grpc.max_receive_message_length", frame_limit),
            ("grpc.max_send_message_length", frame_limit),
            ("grpc.keepalive_time_ms", self.keepalive_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Server side: accept the peer's keepalive pings on an idle stream. The default (one per
            # 5 min) answers our 10 s pings with GOAWAY "too_many_pings" after ~30 s without data,
            # which dropped devices that waited for the server to serve the others or evaluate.
            ("grpc.http2.min_ping_interval_without_data_ms", self.keepalive_ms // 2),
        ]


class Session:
    """One end of a device stream: ``send`` messages, ``receive`` the next one (or the error it caused).

    With ``strict``, (the server side) a message that arrives when no reply is expected is
    answered at once with an ``error`` message and dropped, so an unsolicited flood never
    queues up in front of the reply to the next request.
    """

    def __init__(self, peer: str, settings: TransportSettings, strict: bool = False) -> None:
        self.peer = peer
        self.settings = settings
        self.strict = strict
        self._expected = 0
        self._lock = threading.Lock()
        self.refused = 0
        self._inbox: queue.Queue[tuple[Message, int] | Exception] = queue.Queue()
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._reassembler = Reassembler(settings.max_message_bytes)
        self._ids = itertools.count()
        self.closed = threading.Event()

    def send(self, message: Message) -> int:
        """Queue ``message`` for the peer; returns its encoded size in bytes."""
        if self.closed.is_set():
            raise DeviceLost(f"{self.peer}: connection closed")
        data = encode(message)
        for frame in split_frames(next(self._ids), data, self.settings.chunk_size):
            self._outbox.put(frame)
        return len(data)

    def receive(self, timeout: float | None) -> tuple[Message, int]:
        """The next message and its size; raises DeviceLost, or the MessageError a bad payload caused."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise DeviceLost(f"{self.peer}: no answer within {timeout:.0f} s") from None
        if isinstance(item, Exception):
            raise item
        return item

    def expect_reply(self) -> None:
        """Announce that the next message from the peer answers a request (strict sessions)."""
        with self._lock:
            self._expected += 1

    def feed(self, frame: bytes) -> None:
        """Called by the reading thread for every frame that arrives."""
        try:
            data = self._reassembler.feed(frame)
            if data is None:
                return
            item: tuple[Message, int] | Exception = (decode(data), len(data))
        except (FrameError, MessageError) as error:
            item = MessageError(f"{self.peer}: {error}")
        with self._lock:
            solicited = not self.strict or self._expected > 0
            self._expected -= int(self.strict and solicited)
        if solicited:
            self._inbox.put(item)
            return
        self.refused += 1
        reason = str(item) if isinstance(item, Exception) else f"unsolicited {item[0].kind} message"
        log.warning("%s: refused: %s", self.peer, reason)
        try:
            self.send(Message("error", "server", 0, 0, values={"reason": reason}))
        except DeviceLost:
            pass

    def outgoing(self) -> Iterator[bytes]:
        while True:
            frame = self._outbox.get()
            if frame is None:
                return
            yield frame

    def close(self, reason: str = "disconnected") -> None:
        if not self.closed.is_set():
            self.closed.set()
            self._outbox.put(None)
            self._inbox.put(DeviceLost(f"{self.peer}: {reason}"))


class LinkServer:
    """The server end: admits configured devices and keeps one Session per connected device."""

    def __init__(self, address: str, tokens: dict[int, str], settings: TransportSettings = TransportSettings()) -> None:
        self.tokens = tokens
        self.settings = settings
        self._sessions: dict[int, Session] = {}
        self._changed = threading.Condition()
        self.rejected: list[str] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=len(tokens) + 8), options=settings.channel_options())
        handler = grpc.method_handlers_generic_handler(
            "splitfed.Link", {"Session": grpc.stream_stream_rpc_method_handler(self._serve)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        if settings.tls_cert and settings.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                root_certificates=settings.tls_ca.read_bytes() if settings.tls_ca else None,
                require_client_auth=settings.tls_ca is not None,
            )
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        self._server.start()

    def _admit(self, context: grpc.ServicerContext) -> int | None:
        metadata = dict(context.invocation_metadata())
        raw_id, token = metadata.get(DEVICE_KEY, ""), metadata.get(TOKEN_KEY, "")
        if not raw_id.isdigit() or int(raw_id) not in self.tokens:
            self._reject(context, grpc.StatusCode.PERMISSION_DENIED, f"unknown device id {raw_id!r}")
            return None
        if not hmac.compare_digest(token.encode(), self.tokens[int(raw_id)].encode()):
            self._reject(context, grpc.StatusCode.UNAUTHENTICATED, f"wrong token for device {raw_id}")
            return None
        return int(raw_id)

    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> None:
        log.warning("refused %s: %s", context.peer(), reason)
        self.rejected.append(reason)
        context.abort(code, reason)

    def _serve(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        device = self._admit(context)
        if device is None:
            return
        session = Session(f"device {device}", self.settings, strict=True)
        with self._changed:
            old = self._sessions.get(device)
            if old is not None:
                old.close()  # a rejoin replaces the stale stream
            self._sessions[device] = session
            self._changed.notify_all()

        def read() -> None:
            try:
                for frame in frames:
                    session.feed(frame)
            except grpc.RpcError:
                pass
            finally:
                session.close()

        threading.Thread(target=read, daemon=True, name=f"read-device-{device}").start()
        context.add_callback(session.close)
        yield from session.outgoing()

    def session(self, device: int) -> Session | None:
        with self._changed:
            session = self._sessions.get(device)
            return None if session is None or session.closed.is_set() else session

    def wait_for(self, devices: list[int], timeout: float) -> list[int]:
        """Block until all ``devices`` are connected or ``timeout`` passes; return the connected ones."""
        with self._changed:
            self._changed.wait_for(lambda: all(self.session(d) for d in devices), timeout=timeout)
        return [d for d in devices if self.session(d)]

    def stop(self, grace: float = 1.0) -> None:
        with self._changed:
            for session in self._sessions.values():
                session.close()
        self._server.stop(grace)


class GrpcTransport:
    """``runtime.remote.Transport`` over the device streams of a LinkServer."""

    def __init__(self, server: LinkServer) -> None:
        self.server = server

    def _session(self, device: int) -> Session:
        session = self.server.session(device)
        if session is None:
            raise DeviceLost(f"device {device}: not connected")
        return session

    def request(self, device: int, message: Message, timeout_s: float) -> tuple[Message, int, int]:
        session = self._session(device)
        session.expect_reply()
        sent = session.send(message)
        reply, received = session.receive(timeout_s)
        return reply, sent, received

    def notify(self, device: int, message: Message) -> None:
        try:
            self._session(device).send(message)
        except DeviceLost:
            pass

    def wait_for(self, devices: list[int], timeout_s: float) -> list[int]:
        return self.server.wait_for(devices, timeout_s)


def connect(
    address: str, device: int, token: str, settings: TransportSettings = TransportSettings(), ready_timeout_s: float = 60.0
) -> Session:
    """The device end: dial the server (waiting up to ``ready_timeout_s`` for it) and return the stream's Session."""
    options = settings.channel_options()
    if settings.tls_ca or settings.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=settings.tls_ca.read_bytes() if settings.tls_ca else None,
            private_key=settings.tls_key.read_bytes() if settings.tls_key else None,
            certificate_chain=settings.tls_cert.read_bytes() if settings.tls_cert else None,
        )
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=ready_timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise DeviceLost(f"server {address} not reachable within {ready_timeout_s:g} s") from None
    session = Session("server", settings)
    metadata = ((DEVICE_KEY, str(device)), (TOKEN_KEY, token))
    call = channel.stream_stream(METHOD)(session.outgoing(), metadata=metadata)

    def read() -> None:
        try:
            for frame in call:
                session.feed(frame)
            session.close()
        except grpc.RpcError as error:
            session.close(f"{error.code().name}: {error.details()}")
        finally:
            channel.close()

    threading.Thread(target=read, daemon=True, name="read-server").start()
    return session

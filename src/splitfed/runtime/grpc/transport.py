"""gRPC transport: one bidirectional stream per device, carrying encoded messages as frames.

Devices dial the server (they may sit behind NAT); the server drives the protocol by
sending requests down each device's stream and reading the replies. Payloads are the
project's own message encoding (safetensors + JSON header), chunked into frames; gRPC
sees only bytes, so no protobuf code generation and no pickle is involved.

Security (docs/deployment.md, "Threat model"): a device presents its id and token in the
call metadata (checked in constant time against the configured tokens) and, optionally, a
client certificate (mutual TLS). Unknown ids and wrong tokens are refused before any
payload is read, counted, and logged as a bounded sample. Every frame is size-limited;
every message is decoded and structurally checked here, and a reply is matched to its
request by id: a message that answers nothing outstanding is refused with a short error
and cannot take a reply's place. Nothing a peer sends raises past this module.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc

from splitfed.errors import UnreachableError
from splitfed.runtime.grpc.frames import DEFAULT_CHUNK, Assembled, FrameError, Reassembler, split_frames
from splitfed.runtime.refusals import Tally
from splitfed.runtime.remote import DeviceLost
from splitfed.wire.messages import Message, MessageError, decode, encode, shown

log = logging.getLogger("splitfed.grpc")

METHOD = "/splitfed.Link/Session"
DEVICE_KEY, TOKEN_KEY = "splitfed-device", "splitfed-token"
CREDENTIAL_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
"""Stream endings that mean the server refused this device: redialing cannot help."""
POLL_S = 0.5


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
    max_reconnect_backoff_ms: int = 5_000
    """Longest wait between a device's connection attempts (gRPC backs off exponentially, with jitter)."""

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


class BadMessage(MessageError):
    """A payload that arrived whole but is not a valid message; ``id`` lets the answer name it."""

    def __init__(self, reason: str, message_id: int = 0) -> None:
        super().__init__(reason)
        self.id = message_id


class Received(NamedTuple):
    message: Message
    size: int
    """Encoded bytes."""
    id: int
    """The sender's id of the message (a reply names it)."""


class Session:
    """One end of a device stream.

    The device end (``strict=False``) ``receive``s requests and ``send``s replies naming the
    request they answer. The server end (``strict=True``) sends ``request``s and waits for
    the message that answers each; anything else that arrives is refused with a short
    ``error`` message and counted in ``refused``, so it never takes a reply's place.
    """

    def __init__(self, peer: str, settings: TransportSettings, strict: bool = False,
                 screen: Callable[[Message], None] | None = None) -> None:
        self.peer = peer
        self.settings = settings
        self.strict = strict
        self.screen = screen
        """Server end: checks a refused message against its kind's schema, for the refusal's reason."""
        self.refused = Tally(peer)
        self.received = 0
        self.end_reason = ""
        self.credentials_refused = False
        """The stream ended because the server refused this device's id, token or certificate."""
        self._lock = threading.Lock()
        self._pending: dict[int, queue.Queue] = {}
        self._inbox: queue.Queue[Received | Exception] = queue.Queue()
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._reassembler = Reassembler(settings.max_message_bytes)
        self._ids = itertools.count(1)
        self.closed = threading.Event()

    # --- sending --------------------------------------------------------------------------
    def send(self, message: Message, reply_to: int = 0) -> int:
        """Queue ``message`` for the peer (as the reply to message ``reply_to``); returns its encoded size."""
        return self._send(message, next(self._ids), reply_to)

    def _send(self, message: Message, message_id: int, reply_to: int) -> int:
        return self._send_bytes(encode(message), message_id, reply_to)

    def _send_bytes(self, data: bytes, message_id: int, reply_to: int) -> int:
        if self.closed.is_set():
            raise DeviceLost(f"{self.peer}: connection closed")
        for frame in split_frames(message_id, data, self.settings.chunk_size, reply_to):
            self._outbox.put(frame)
        return len(data)

    def request(self, message: Message, timeout: float) -> tuple[Message, int, int]:
        """Send ``message`` and wait for the message that answers it: (reply, bytes sent, bytes received).

        Raises DeviceLost (closed, or no answer in time) or the MessageError its answer caused."""
        return self.exchange(encode(message), timeout)

    def exchange(self, data: bytes, timeout: float) -> tuple[Message, int, int]:
        """``request`` for a payload already encoded (or any bytes at all: fuzz tests send those)."""
        answer: queue.Queue[Received | Exception] = queue.Queue(maxsize=1)
        request_id = next(self._ids)
        with self._lock:
            self._pending[request_id] = answer
        try:
            sent = self._send_bytes(data, request_id, 0)
            if self.closed.is_set():
                raise DeviceLost(f"{self.peer}: {self.end_reason or 'connection closed'}")
            try:
                item = answer.get(timeout=timeout)
            except queue.Empty:
                raise DeviceLost(f"{self.peer}: no answer within {timeout:.0f} s") from None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if isinstance(item, Exception):
            raise item
        return item.message, sent, item.size

    # --- receiving ------------------------------------------------------------------------
    def receive(self, timeout: float | None) -> Received:
        """Device end: the next request; raises DeviceLost, or the MessageError a bad payload caused."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise DeviceLost(f"{self.peer}: no answer within {timeout:.0f} s") from None
        if isinstance(item, Exception):
            raise item
        return item

    def feed(self, frame: bytes) -> None:
        """Called by the reading thread for every frame that arrives; never raises."""
        try:
            assembled = self._reassembler.feed(frame)
        except FrameError as error:
            self._deliver(None, BadMessage(f"{self.peer}: {error}"))
            return
        if assembled is None:
            return
        self.received += 1
        try:
            item: Received | Exception = Received(decode(assembled.data), len(assembled.data), assembled.message_id)
        except MessageError as error:
            item = BadMessage(f"{self.peer}: {error}", assembled.message_id)
        except Exception as error:  # noqa: BLE001 - a payload no decoder anticipated is still only refused
            item = BadMessage(f"{self.peer}: undecodable payload: {shown(str(error))}", assembled.message_id)
        self._deliver(assembled, item)

    def _deliver(self, assembled: Assembled | None, item: Received | Exception) -> None:
        if not self.strict:
            self._inbox.put(item)
            return
        answer = None
        if assembled is not None and assembled.reply_to:
            with self._lock:
                answer = self._pending.pop(assembled.reply_to, None)
        if answer is not None:
            answer.put(item)
            return
        self._refuse(item)

    def _refuse(self, item: Received | Exception) -> None:
        """Answer a message that answers no outstanding request with a short error, and count it."""
        if isinstance(item, Exception):
            reason = str(item)
        else:
            reason = f"unsolicited {item.message.kind} message (it answers no outstanding request)"
            if self.screen is not None:
                try:
                    self.screen(item.message)
                except MessageError as error:
                    reason = f"{reason}; also: {error}"
                except Exception as error:  # noqa: BLE001
                    reason = f"{reason}; also failed its checks: {shown(str(error))}"
        reason = reason[:500]
        self.refused.add(reason)
        try:
            self.send(Message("error", "server", 0, 0, values={"reason": reason}))
        except DeviceLost:
            pass

    # --- the stream -----------------------------------------------------------------------
    def outgoing(self) -> Iterator[bytes]:
        while True:
            try:
                frame = self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                if self.closed.is_set():
                    return
                continue
            if frame is None:
                return
            yield frame

    def read_from(self, frames: Iterator[bytes]) -> None:
        """Feed every frame of ``frames`` (the peer's side of the stream) until it ends; then close."""
        try:
            for frame in frames:
                self.feed(frame)
            self.close()
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            self.close(f"{getattr(code, 'name', 'RPC error')}: {shown(error.details(), 300) if hasattr(error, 'details') else ''}",
                       credentials_refused=code in CREDENTIAL_CODES)
        except Exception as error:  # noqa: BLE001 - the stream ends; the process goes on
            log.warning("%s: stream ended: %s", self.peer, shown(str(error), 300))
            self.close(f"stream failed: {shown(str(error))}")

    def close(self, reason: str = "disconnected", credentials_refused: bool = False) -> None:
        with self._lock:
            if self.closed.is_set():
                return
            self.end_reason = reason
            self.credentials_refused = credentials_refused
            self.closed.set()
            pending = list(self._pending.values())
            self._pending.clear()
        self._outbox.put(None)
        lost = DeviceLost(f"{self.peer}: {reason}")
        self._inbox.put(lost)
        for answer in pending:
            answer.put(lost)


class LinkServer:
    """The server end: admits configured devices and keeps one Session per connected device."""

    def __init__(self, address: str, tokens: dict[int, str], settings: TransportSettings = TransportSettings()) -> None:
        self.tokens = tokens
        self.settings = settings
        self.screen: Callable[[int, Message], None] | None = None
        """Checks a refused message of a device against its kind's schema (set by the deployment)."""
        self.rejected = Tally("connection")
        self._sessions: dict[int, Session] = {}
        self._changed = threading.Condition()
        self._stopping = False
        streams = 2 * len(tokens) + 8  # every device, a rejoin overlapping its old stream, and a few refusals
        self._executor = futures.ThreadPoolExecutor(max_workers=streams, thread_name_prefix="splitfed-grpc")
        # so_reuseport 0: a second server on a port in use fails to bind instead of sharing its connections
        options = [*settings.channel_options(), ("grpc.so_reuseport", 0)]
        self._server = grpc.server(self._executor, options=options, maximum_concurrent_rpcs=streams)
        handler = grpc.method_handlers_generic_handler(
            "splitfed.Link", {"Session": grpc.stream_stream_rpc_method_handler(self._serve)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        try:
            if settings.tls_cert and settings.tls_key:
                credentials = grpc.ssl_server_credentials(
                    [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                    root_certificates=settings.tls_ca.read_bytes() if settings.tls_ca else None,
                    require_client_auth=settings.tls_ca is not None,
                )
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpc raises RuntimeError when it cannot bind
            self.port = 0
        if not self.port:
            self._executor.shutdown(wait=False)
            raise UnreachableError(f"cannot listen on {address} (runtime.address): the port is in use "
                                   "or the address is not one of this machine's")
        self._server.start()

    def _admit(self, context: grpc.ServicerContext) -> int | None:
        metadata = dict(context.invocation_metadata())
        raw_id, token = str(metadata.get(DEVICE_KEY, "")), str(metadata.get(TOKEN_KEY, ""))
        if self._stopping:
            self._reject(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            return None
        if not raw_id.isdigit() or len(raw_id) > 9 or int(raw_id) not in self.tokens:
            self._reject(context, grpc.StatusCode.PERMISSION_DENIED, f"unknown device id {shown(raw_id, 30)}")
            return None
        if not hmac.compare_digest(token.encode(), self.tokens[int(raw_id)].encode()):
            self._reject(context, grpc.StatusCode.UNAUTHENTICATED, f"wrong token for device {raw_id}")
            return None
        return int(raw_id)

    def _reject(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> None:
        self.rejected.add(f"{shown(context.peer(), 40)}: {reason}")
        context.abort(code, reason)

    def _serve(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        device = self._admit(context)
        if device is None:
            return
        session = Session(f"device {device}", self.settings, strict=True,
                          screen=lambda message: self.screen(device, message) if self.screen else None)
        with self._changed:
            if self._stopping:
                return
            old = self._sessions.get(device)
            if old is not None:
                old.close("replaced by a new connection")  # a rejoin replaces the stale stream
            self._sessions[device] = session
            self._changed.notify_all()
        threading.Thread(target=session.read_from, args=(frames,), daemon=True, name=f"read-device-{device}").start()
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

    def stop(self, grace: float = 1.0, deadline_s: float = 5.0) -> None:
        """Refuse new streams, end every session, and wait (at most ``grace + deadline_s``) for gRPC to stop."""
        with self._changed:
            self._stopping = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close("the server stopped")
        if not self._server.stop(grace).wait(grace + deadline_s):
            log.warning("gRPC server did not stop within %.0f s", grace + deadline_s)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.rejected.count:
            log.info("%d connections were refused during the run", self.rejected.count)


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
        return self._session(device).request(message, timeout_s)

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
    """The device end: dial the server (waiting up to ``ready_timeout_s`` for it) and return the stream's Session.

    While the server is unreachable gRPC redials with exponential backoff and jitter (at most
    ``settings.max_reconnect_backoff_ms`` apart)."""
    options = [*settings.channel_options(), ("grpc.initial_reconnect_backoff_ms", 250),
               ("grpc.min_reconnect_backoff_ms", 250),
               ("grpc.max_reconnect_backoff_ms", settings.max_reconnect_backoff_ms)]
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
            session.read_from(call)
        finally:
            channel.close()

    threading.Thread(target=read, daemon=True, name="read-server").start()
    return session


def wait_before_redial(attempt: int, remaining_s: float, rng: Callable[[], float], base_s: float = 0.5,
                       cap_s: float = 10.0) -> float:
    """Sleep before a device's next connection attempt: exponential backoff with jitter, within ``remaining_s``."""
    delay = min(cap_s, base_s * 2**attempt) * (0.5 + rng())
    delay = max(0.0, min(delay, remaining_s))
    time.sleep(delay)
    return delay

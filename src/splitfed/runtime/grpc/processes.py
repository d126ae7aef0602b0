"""Entry points of the gRPC runtime: the server process and a device process.

``serve`` starts the transport, waits for the configured devices, and runs the same
engine and protocol code as an in-process run, with remote device handles. ``run_device``
loads only the device's own stage weights and its own data partition, dials the server
and answers its requests.
"""

from __future__ import annotations

import logging
from pathlib import Path

from splitfed.config import ConfigError, RunConfig, RuntimeSection
from splitfed.runtime.endpoint import serve_device
from splitfed.runtime.hosting import host_devices
from splitfed.runtime.grpc.transport import GrpcTransport, LinkServer, TransportSettings, connect
from splitfed.runtime.link import message_codec
from splitfed.runtime.remote import remote_devices

log = logging.getLogger("splitfed.grpc")


def transport_settings(runtime: RuntimeSection) -> TransportSettings:
    path = lambda value: Path(value) if value else None  # noqa: E731
    return TransportSettings(
        max_message_bytes=int(runtime.max_message_mb * (1 << 20)),
        tls_cert=path(runtime.tls_cert), tls_key=path(runtime.tls_key), tls_ca=path(runtime.tls_ca),
    )


def serve(config: RunConfig, out: Path, *, progress: bool = True, resume: bool = False) -> dict:
    """Run the server (and aggregator) of a gRPC deployment; returns the run summary."""
    from splitfed.run import run

    runtime = config.runtime
    tokens = {i: runtime.tokens[i] for i in range(config.devices.count)}
    server = LinkServer(runtime.address, tokens, transport_settings(runtime))
    log.info("listening on %s (port %d)", runtime.address, server.port)
    try:
        devices = list(range(config.devices.count))
        connected = server.wait_for(devices, runtime.connect_timeout_s)
        if len(connected) < len(devices):
            missing = sorted(set(devices) - set(connected))
            raise ConfigError(f"devices {missing} did not connect within runtime.connect_timeout_s={runtime.connect_timeout_s:g} s")
        remote = remote_devices(config, GrpcTransport(server))
        try:
            return run(config, out, progress=progress, resume=resume, remote=remote)
        finally:
            remote.stop_all()
    finally:
        server.stop()


def run_device(config: RunConfig, device: int, *, address: str | None = None, token: str | None = None) -> None:
    """A device process: its stage weights, its data, its adapter; serves until the server stops it."""
    if not 0 <= device < config.devices.count:
        raise ConfigError(f"--id {device}: allowed 0..{config.devices.count - 1} (devices.count={config.devices.count})")
    role = host_devices(config, [device])[device]
    codec = message_codec(config)
    settings = transport_settings(config.runtime)
    token = token if token is not None else config.runtime.tokens[device]
    address = address or config.runtime.address
    log.info("device %d: layers %d..%d, %d training sequences, dialing %s", device, role.layers.start,
             role.layers.stop - 1, role.num_samples, address)
    # A lost connection (server restart, network) is retried until the server says stop.
    while True:
        session = connect(address, device, token, settings, ready_timeout_s=config.runtime.connect_timeout_s)
        if serve_device(role, session, codec):
            return
        log.info("device %d: reconnecting", device)

"""Process entry points of a deployment: the gRPC server and device processes, and Ray host actors.

``serve`` starts the gRPC transport, waits for the configured devices, and runs the same
engine and protocol code as an in-process run, with remote handles for the devices.
``run_device`` loads only the device's own stage weights and its own data partition, dials
the server and answers its requests. ``run_on_ray`` hosts the devices in Ray actors, each
process holding one base stage model for several devices. The workers a process hosts are
built from the protocol's declared topology (``host_devices``), so any protocol deploys.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from splitfed.adapters.lora import add_adapter, get_adapter_state, layout_config
from splitfed.adapters.merge import merge_shapes
from splitfed.config import ConfigError, RunConfig, RuntimeSection, parse_config
from splitfed.models.families import family_for, num_layers
from splitfed.models.loading import load_model_config, load_stage_model, load_tokenizer, prepare_model
from splitfed.models.split import Stage, StageSpec
from splitfed.protocols.base import adapter_layout
from splitfed.registry import protocol_class
from splitfed.roles.worker import StageWorker
from splitfed.run import build_data, check_run_dir, plan_run, run
from splitfed.errors import RefusedError, UnreachableError
from splitfed.runtime.endpoint import HostedDevice, refusal, respond, serve_device
from splitfed.runtime.grpc.transport import GrpcTransport, LinkServer, TransportSettings, connect, wait_before_redial
from splitfed.runtime.link import message_codec
from splitfed.runtime.ray import RayTransport
from splitfed.runtime.remote import DeviceLost, Limits, RemoteDevices
from splitfed.seeding import Purpose, derive_seed
from splitfed.wire.messages import MessageError, decode, encode
from splitfed.wire.schema import Bounds

log = logging.getLogger("splitfed.deploy")


# --- building what a process hosts ----------------------------------------------------------
def host_devices(config: RunConfig, devices: list[int]) -> dict[int, HostedDevice]:
    """The first-stage workers of ``devices`` on one base model holding only the layers they run."""
    if config.runtime.device_threads:
        torch.set_num_threads(config.runtime.device_threads)
    plan = plan_run(config)
    model_dir = str(prepare_model(config.model.source))
    total = num_layers(load_model_config(config.model.source))
    topology = protocol_class(config.protocol).topology(config, plan.cuts, total)
    stages = {u: topology.routes[u].first for u in devices}
    cover = StageSpec(0, max(s.end for s in stages.values()), first=True, last=any(s.last for s in stages.values()))
    model = load_stage_model(model_dir, cover)
    family = family_for(model.config)
    data = build_data(plan, load_tokenizer(config.model.source))
    hosted = {}
    for u, stage in stages.items():
        torch.manual_seed(derive_seed(config.seed, Purpose.ADAPTER_INIT, u))  # overwritten by the first download
        add_adapter(model, stage.worker, layout_config(family, adapter_layout(config, stage), config.lora.dropout))
        worker = StageWorker(stage.worker, config.train)
        spec = StageSpec(stage.start, stage.end, stage.first, stage.last)
        worker.add_slot(stage.slot, Stage(model, spec, family), stage.worker, data.train[u],
                        derive_seed(config.seed, Purpose.BATCHES, u))
        trace = None
        if config.runtime.trace_dir:
            Path(config.runtime.trace_dir).mkdir(parents=True, exist_ok=True)
            trace = Path(config.runtime.trace_dir) / f"{stage.worker}.jsonl"
        adapter = {k: tuple(v.shape) for k, v in get_adapter_state(model, stage.worker).items()}
        servers = frozenset({"server", "aggregator", topology.aggregator, *(s.worker for s in topology.routes[u].stages[1:])})
        bounds = replace(message_bounds(config), adapter=adapter,
                         merge_modules=merge_shapes(model, family, stage.layers, config.lora.targets))
        hosted[u] = HostedDevice(u, worker, bounds, servers, trace, layout=adapter_layout(config, stage),
                                 dropout=config.lora.dropout)
    return hosted


def message_bounds(config: RunConfig) -> Bounds:
    """What a message between the server and a device may hold, from the model and the config."""
    model_config = load_model_config(config.model.source)
    largest_rank = protocol_class(config.protocol).largest_rank(config)
    return Bounds(int(model_config.hidden_size), int(model_config.vocab_size), config.train.seq_len,
                  config.train.batch_size, max_merge_rank=config.devices.count * largest_rank)


def remote_devices(config: RunConfig, transport, concurrent: bool = True) -> RemoteDevices:
    """Handles for the devices of ``config`` reached over ``transport``, with the run's limits."""
    limits = Limits(message_bounds(config), config.runtime.request_timeout_s)
    return RemoteDevices(transport, limits, concurrent=concurrent)


# --- gRPC -----------------------------------------------------------------------------------
def transport_settings(runtime: RuntimeSection) -> TransportSettings:
    path = lambda value: Path(value) if value else None  # noqa: E731
    return TransportSettings(
        max_message_bytes=int(runtime.max_message_mb * (1 << 20)),
        tls_cert=path(runtime.tls_cert), tls_key=path(runtime.tls_key), tls_ca=path(runtime.tls_ca),
    )


def serve(config: RunConfig, out: Path, *, progress: bool = True, resume: bool = False,
          resume_from: str | None = None, concurrent: bool = True, overwrite: bool = False) -> dict:
    """Run the server side (and aggregator) of a gRPC deployment; returns the run summary.

    ``concurrent=False`` sends the devices' requests one at a time (for measurements only)."""
    runtime = config.runtime
    # a used run directory or a resume that cannot work is refused before devices are waited for
    check_run_dir(plan_run(config), out, resume=resume, resume_from=resume_from, overwrite=overwrite)
    tokens = {i: runtime.tokens[i] for i in range(config.devices.count)}
    server = LinkServer(runtime.address, tokens, transport_settings(runtime))
    log.info("listening on %s (port %d)", runtime.address, server.port)
    try:
        devices = list(range(config.devices.count))
        connected = server.wait_for(devices, runtime.connect_timeout_s)
        if len(connected) < len(devices):
            missing = sorted(set(devices) - set(connected))
            raise ConfigError(f"devices {missing} did not connect within runtime.connect_timeout_s={runtime.connect_timeout_s:g} s")
        remote = remote_devices(config, GrpcTransport(server), concurrent)
        server.screen = remote.screen
        try:
            return run(config, out, progress=progress, resume=resume, resume_from=resume_from, remote=remote,
                       overwrite=overwrite)
        finally:
            remote.stop_all()
    finally:
        server.stop()


def run_device(config: RunConfig, device: int, *, address: str | None = None, token: str | None = None) -> None:
    """A device process: its stage weights, its data, its adapter; serves until the server stops it."""
    if not 0 <= device < config.devices.count:
        raise ConfigError(f"--id {device}: allowed 0..{config.devices.count - 1} (devices.count={config.devices.count})")
    hosted = host_devices(config, [device])[device]
    codec = message_codec(config)
    settings = transport_settings(config.runtime)
    token = token if token is not None else config.runtime.tokens[device]
    address = address or config.runtime.address
    slot = next(iter(hosted.worker.slots.values()))
    log.info("device %d: layers %d..%d, %d training sequences, dialing %s", device, slot.stage.spec.start,
             slot.stage.spec.end - 1, slot.num_samples, address)
    # A lost connection (server restart, network) is redialed with backoff until the server says stop;
    # a refusal of the credentials is final, and so is a server unreachable for runtime.connect_timeout_s.
    budget = config.runtime.connect_timeout_s
    jitter = random.Random(derive_seed(config.seed, Purpose.BATCHES, device) ^ os.getpid()).random
    lost_since, attempt = time.monotonic(), 0
    while True:
        remaining = budget - (time.monotonic() - lost_since)
        if remaining <= 0:
            raise UnreachableError(f"device {device}: server {address} not reachable for {budget:g} s "
                                   "(runtime.connect_timeout_s); giving up")
        try:
            session = connect(address, device, token, settings, ready_timeout_s=remaining)
        except DeviceLost:
            continue
        if serve_device(hosted, session, codec):
            return
        if session.credentials_refused:
            raise RefusedError(f"device {device}: the server at {address} refused this device ({session.end_reason}); "
                               f"check --id, --token (runtime.tokens[{device}]) and the TLS certificates")
        if session.received:  # it worked for a while: the budget starts again from now
            lost_since, attempt = time.monotonic(), 0
        log.info("device %d: connection ended (%s); redialing", device, session.end_reason)
        wait_before_redial(attempt, budget - (time.monotonic() - lost_since), jitter)
        attempt += 1


# --- Ray ------------------------------------------------------------------------------------
@ray.remote
class DeviceHost:
    """One process hosting several devices; answers encoded requests with encoded replies."""

    def __init__(self, config_tree: dict, devices: list[int]) -> None:
        config = parse_config(config_tree)
        self.devices = host_devices(config, devices)
        self.codec = message_codec(config)

    def call(self, device: int, payload: bytes) -> bytes:
        hosted = self.devices[device]
        try:
            request = decode(payload)
        except MessageError as error:
            return encode(refusal(hosted, str(error)[:500]))
        reply = respond(hosted, request, self.codec)
        return b"" if reply is None else encode(reply)


def run_on_ray(config: RunConfig, out: Path, *, progress: bool = True, resume: bool = False,
               resume_from: str | None = None, overwrite: bool = False) -> dict:
    """Run an experiment whose devices are Ray actors; returns the run summary.

    Requests to devices of different host actors run at the same time; the devices of one
    host share its process and take turns."""
    runtime = config.runtime
    check_run_dir(plan_run(config), out, resume=resume, resume_from=resume_from, overwrite=overwrite)  # before Ray starts
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=runtime.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        count = config.devices.count
        hosts_wanted = runtime.ray_hosts or max(1, min(count, int(ray.available_resources().get("CPU", 1))))
        assignment = {h: [u for u in range(count) if u % hosts_wanted == h] for h in range(hosts_wanted)}
        tree = config.to_tree()
        actors = {h: DeviceHost.options(num_cpus=0).remote(tree, devices) for h, devices in assignment.items()}
        transport = RayTransport({u: actors[h] for h, devices in assignment.items() for u in devices})
        remote = remote_devices(config, transport)
        log.info("%d devices on %d Ray host actors", count, len(actors))
        try:
            return run(config, out, progress=progress, resume=resume, resume_from=resume_from, remote=remote,
                       overwrite=overwrite)
        finally:
            remote.stop_all()
    finally:
        if started_here:
            ray.shutdown()

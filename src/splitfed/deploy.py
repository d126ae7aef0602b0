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
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
import torch

from splitfed.adapters.merge import merge_shapes
from splitfed.config import ConfigError, RunConfig, RuntimeSection, parse_config
from splitfed.data.partition import local_dataset
from splitfed.data.sources import load_documents
from splitfed.models.families import family_for, num_layers
from splitfed.models.loading import load_model_config, load_stage_model, load_tokenizer, prepare_model
from splitfed.models.split import Stage, StageSpec
from splitfed.protocols.base import adapter_layout, adapter_pool
from splitfed.registry import protocol_class
from splitfed.roles.worker import StageWorker
from splitfed.run import ValidatedRun, build_data, check_run_dir, plan_run, run
from splitfed.errors import RefusedError, UnreachableError
from splitfed.runtime.edge import EdgeServer
from splitfed.runtime.endpoint import HostedDevice, is_stop, refusal, respond, serve_device
from splitfed.runtime.grpc.transport import (
    GrpcTransport,
    LinkServer,
    Session,
    TransportSettings,
    connect,
    wait_before_redial,
)
from splitfed.runtime.link import message_codec
from splitfed.runtime.ray import RayTransport
from splitfed.runtime.remote import DeviceLost, Limits, RemoteDevices
from splitfed.seeding import Purpose, derive_seed
from splitfed.topology import EDGE_TIER, Topology, edge_index, edge_peers
from splitfed.wire.messages import Message, MessageError, decode, encode
from splitfed.wire.schema import Bounds

log = logging.getLogger("splitfed.deploy")


# --- building what a process hosts ----------------------------------------------------------
def run_topology(config: RunConfig, with_data: bool = False) -> tuple[ValidatedRun, Topology]:
    """The run's plan (its data only ``with_data``) and the topology its protocol declares (no weights loaded)."""
    plan = plan_run(config, with_data=with_data)
    total = num_layers(load_model_config(config.model.source))
    return plan, protocol_class(config.protocol).topology(config, plan.cuts, total)


def host_devices(config: RunConfig, devices: list[int], data_path: str | None = None) -> dict[int, HostedDevice]:
    """The first-stage workers of ``devices`` on one base model holding only the layers they run; each reads
    its partition of the run's data, or (one device) every row of ``data_path``, its own data."""
    if config.runtime.device_threads:
        torch.set_num_threads(config.runtime.device_threads)
    if data_path is not None and len(devices) != 1:
        raise ConfigError("a data path of its own is for one device")
    device = config.compute.torch_device("device")  # an absent accelerator is refused before anything loads
    plan, topology = run_topology(config, with_data=data_path is None)
    model_dir = str(prepare_model(config.model.source))
    stages = {u: topology.routes[u].first for u in devices}
    cover = StageSpec(0, max(s.end for s in stages.values()), first=True, last=any(s.last for s in stages.values()))
    model = load_stage_model(model_dir, cover, config.compute.torch_dtype, device)
    family = family_for(model.config)
    tokenizer = load_tokenizer(config.model.source)
    if data_path is None:
        train = build_data(plan, tokenizer).train
    else:
        try:
            own = local_dataset(load_documents(data_path, setting="--data"), tokenizer, config.train.seq_len,
                                config.data.truncation, config.data.template)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        train = {devices[0]: own}
    hosted = {}
    pool = adapter_pool(config, family)  # the devices of this process share a few adapters of the one model
    for u, stage in stages.items():
        worker = StageWorker(stage.worker, config.train, pool)
        spec = StageSpec(stage.start, stage.end, stage.first, stage.last)
        slot = worker.add_slot(stage.slot, Stage(model, spec, family), adapter_layout(config, stage), train[u],
                               derive_seed(config.seed, Purpose.BATCHES, u))
        trace = None
        if config.runtime.trace_dir:
            Path(config.runtime.trace_dir).mkdir(parents=True, exist_ok=True)
            trace = Path(config.runtime.trace_dir) / f"{stage.worker}.jsonl"
        adapter = slot.shapes()
        servers = frozenset({"server", "aggregator", topology.aggregator, *(s.worker for s in topology.routes[u].stages[1:])})
        bounds = replace(message_bounds(config), adapter=adapter,
                         merge_modules=merge_shapes(model, family, stage.layers, config.lora.targets))
        hosted[u] = HostedDevice(u, worker, bounds, servers, trace, layout=adapter_layout(config, stage))
    return hosted


def message_bounds(config: RunConfig) -> Bounds:
    """What a message between the server and a device may hold, from the model and the config."""
    model_config = load_model_config(config.model.source)
    largest_rank = protocol_class(config.protocol).largest_rank(config)
    return Bounds(int(model_config.hidden_size), int(model_config.vocab_size), config.train.seq_len,
                  config.train.batch_size, max_merge_rank=config.devices.count * largest_rank,
                  activation_dtype=config.compute.torch_dtype)


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
    plan, topology = run_topology(config)
    check_run_dir(plan, out, resume=resume, resume_from=resume_from, overwrite=overwrite)
    tokens = cloud_tokens(config, topology)
    server = LinkServer(runtime.address, tokens, transport_settings(runtime))
    log.info("listening on %s (port %d)", runtime.address, server.port)
    try:
        connected = server.wait_for(sorted(tokens), runtime.connect_timeout_s)
        if len(connected) < len(tokens):
            missing = sorted(set(tokens) - set(connected))
            names = [_peer_name(topology, peer) for peer in missing]
            raise ConfigError(f"{', '.join(names)} did not connect within runtime.connect_timeout_s="
                              f"{runtime.connect_timeout_s:g} s")
        remote = remote_devices(config, GrpcTransport(server), concurrent)
        server.screen = remote.screen
        try:
            return run(config, out, progress=progress, resume=resume, resume_from=resume_from, remote=remote,
                       overwrite=overwrite)
        finally:
            remote.stop_all()
    finally:
        server.stop()


def run_device(config: RunConfig, device: int, *, address: str | None = None, token: str | None = None,
               data_path: str | None = None) -> None:
    """A device process: its stage weights, its data (its partition, or every row of ``data_path``), its
    adapter; serves until the server stops it. It dials the server, or its edge server when its route
    passes one (``runtime.edge_addresses``)."""
    if not 0 <= device < config.devices.count:
        raise ConfigError(f"--id {device}: allowed 0..{config.devices.count - 1} (devices.count={config.devices.count})")
    hosted = host_devices(config, [device], data_path)[device]
    codec = message_codec(config)
    token = token if token is not None else config.runtime.tokens[device]
    address = address or device_address(config, run_topology(config)[1], device)
    slot = next(iter(hosted.worker.slots.values()))
    log.info("device %d: layers %d..%d, %d training sequences, dialing %s", device, slot.stage.spec.start,
             slot.stage.spec.end - 1, slot.num_samples, address)
    keep_connected(config, address, device, token, f"device {device}", f"runtime.tokens[{device}]",
                   lambda session: serve_device(hosted, session, codec), seed=device)


def keep_connected(config: RunConfig, address: str, peer: int, token: str, label: str, token_setting: str,
                   serve_session: Callable[[Session], bool], seed: int, stop: threading.Event | None = None) -> None:
    """Dial ``address`` as stream ``peer`` and serve the session until the far end says stop (``serve_session``
    returns True). A lost connection (server restart, network) is redialed with backoff; a refusal of the
    credentials is final, and so is a server unreachable for runtime.connect_timeout_s."""
    settings = transport_settings(config.runtime)
    budget = config.runtime.connect_timeout_s
    jitter = random.Random(derive_seed(config.seed, Purpose.BATCHES, seed) ^ os.getpid()).random
    lost_since, attempt = time.monotonic(), 0
    while stop is None or not stop.is_set():
        remaining = budget - (time.monotonic() - lost_since)
        if remaining <= 0:
            raise UnreachableError(f"{label}: server {address} not reachable for {budget:g} s "
                                   "(runtime.connect_timeout_s); giving up")
        try:
            session = connect(address, peer, token, settings, ready_timeout_s=remaining)
        except DeviceLost:
            continue
        if serve_session(session):
            return
        if session.credentials_refused:
            raise RefusedError(f"{label}: the server at {address} refused this {label.split()[0]} ({session.end_reason}); "
                               f"check --id, --token ({token_setting}) and the TLS certificates")
        if session.received:  # it worked for a while: the budget starts again from now
            lost_since, attempt = time.monotonic(), 0
        log.info("%s: connection ended (%s); redialing", label, session.end_reason)
        wait_before_redial(attempt, budget - (time.monotonic() - lost_since), jitter)
        attempt += 1


def device_address(config: RunConfig, topology: Topology, device: int) -> str:
    """Where device ``device`` dials: its edge server's address, or the server's."""
    stages = topology.routes[device].stages
    if len(stages) > 1 and stages[1].tier == EDGE_TIER:
        return _edge_setting(config, config.runtime.edge_addresses, edge_index(stages[1].worker), "edge_addresses")
    return config.runtime.address


def cloud_tokens(config: RunConfig, topology: Topology) -> dict[int, str]:
    """Who may open a stream at the server and with which token: each device with its own; behind an
    edge, the edge's token for its users' relayed streams and for each of its slots' streams."""
    tokens = {}
    for route in topology.routes:
        stages = route.stages
        behind = stages[1].worker if len(stages) > 1 and stages[1].tier == EDGE_TIER else None
        tokens[route.device] = (config.runtime.tokens[route.device] if behind is None else
                                _edge_setting(config, config.runtime.edge_tokens, edge_index(behind), "edge_tokens"))
    for (worker, _), peer in edge_peers(topology).items():
        tokens[peer] = _edge_setting(config, config.runtime.edge_tokens, edge_index(worker), "edge_tokens")
    return tokens


def _edge_setting(config: RunConfig, values: list[str], edge: int, field: str) -> str:
    if edge >= len(values):
        raise ConfigError(f"runtime.{field}: edge {edge} has no entry ({len(values)} given); a three-tier run over "
                          "gRPC needs one per edge server")
    return values[edge]


def _peer_name(topology: Topology, peer: int) -> str:
    if peer < len(topology.routes):
        return f"device {peer}"
    worker, slot = next(key for key, p in edge_peers(topology).items() if p == peer)
    return f"{worker} (slot {slot})"


# --- edge servers ---------------------------------------------------------------------------
def host_edge(config: RunConfig, index: int) -> EdgeServer:
    """Edge ``index``'s worker on a base model holding only its layers, with one slot per user cut it serves."""
    if config.runtime.device_threads:
        torch.set_num_threads(config.runtime.device_threads)
    _, topology = run_topology(config)
    name = f"{EDGE_TIER}{index}"
    slots = topology.workers().get(name)
    if not slots:
        edges = sorted(w for w in topology.workers() if topology.tier_of(w) == EDGE_TIER)
        raise ConfigError(f"--id {index}: this run has no {name}; its edge servers: {edges or 'none'}")
    device = config.compute.torch_device(EDGE_TIER)  # before any weights load
    model = load_stage_model(str(prepare_model(config.model.source)),
                             StageSpec(min(s.start for s in slots), max(s.end for s in slots), False, False),
                             config.compute.torch_dtype, device)
    family = family_for(model.config)
    worker = StageWorker(name, config.train, adapter_pool(config, family))
    bounds = {}
    for stage in slots:
        slot = worker.add_slot(stage.slot, Stage(model, StageSpec(stage.start, stage.end, False, False), family),
                               adapter_layout(config, stage))
        bounds[stage.slot] = replace(message_bounds(config), adapter=slot.shapes(),
                                     merge_modules=merge_shapes(model, family, stage.layers, config.lora.targets))
    edge = EdgeServer(index, worker, message_codec(config), message_bounds(config),
                      {s.slot: set(topology.routes_of(s.key)) for s in slots})
    peers = {slot: peer for (worker_name, slot), peer in edge_peers(topology).items() if worker_name == name}
    edge.build_slots(peers, bounds, frozenset({"server", "aggregator", topology.aggregator}))
    if config.runtime.trace_dir:
        Path(config.runtime.trace_dir).mkdir(parents=True, exist_ok=True)
        for endpoint in edge.slots.values():
            endpoint.trace = Path(config.runtime.trace_dir) / f"{name}.jsonl"
    return edge


def run_edge(config: RunConfig, index: int, *, token: str | None = None) -> None:
    """An edge server process: its layers, a gRPC server for its users (``runtime.edge_addresses[index]``),
    and streams to the cloud (``runtime.address``) for each of its slots and each connected user. It
    serves until the cloud stops every slot stream."""
    runtime = config.runtime
    edge = host_edge(config, index)
    token = token if token is not None else _edge_setting(config, runtime.edge_tokens, index, "edge_tokens")
    address = _edge_setting(config, runtime.edge_addresses, index, "edge_addresses")
    users = sorted(set().union(*edge.slot_routes.values()))
    server = LinkServer(address, {u: runtime.tokens[u] for u in users}, transport_settings(runtime))
    log.info("%s: layers %s, users %s, listening on %s (port %d), cloud %s", edge.name,
             {s: (e.worker.slot(s).stage.spec.start, e.worker.slot(s).stage.spec.end)
              for s, e in edge.slots.items()}, users, address, server.port, runtime.address)
    stop = threading.Event()
    codec = message_codec(config)
    failures: list[Exception] = []

    def slot_stream(endpoint: HostedDevice) -> None:
        try:
            keep_connected(config, runtime.address, endpoint.id, token, f"edge {index} (slot {endpoint.slot})",
                           f"runtime.edge_tokens[{index}]", lambda session: serve_device(endpoint, session, codec),
                           endpoint.id, stop=stop)
        except (RefusedError, UnreachableError) as error:  # ends the process (below) with this one line
            failures.append(error)
            stop.set()

    streams = [threading.Thread(target=slot_stream, args=(endpoint,), daemon=True, name=f"{edge.name}-{slot}")
               for slot, endpoint in edge.slots.items()]
    for thread in streams:
        thread.start()
    relays: dict[int, tuple[Session, threading.Thread]] = {}
    try:
        while any(thread.is_alive() for thread in streams) and not stop.is_set():
            for u in users:  # a user that (re)connected gets a stream to the cloud
                session = server.session(u)
                if session is not None and (u not in relays or relays[u][0] is not session):
                    thread = threading.Thread(target=_relay_user, args=(config, edge, u, session, token, stop),
                                              daemon=True, name=f"{edge.name}-user{u}")
                    thread.start()
                    relays[u] = (session, thread)
            time.sleep(0.1)
        if failures:
            raise failures[0]
        for _, thread in relays.values():  # the cloud's stop reaches the users through their relays
            thread.join(timeout=10)
    finally:
        stop.set()
        server.stop()


def _relay_user(config: RunConfig, edge: EdgeServer, user: int, session: Session, token: str,
                stop: threading.Event) -> None:
    """Relay the cloud's requests for ``user`` to it (``EdgeServer.relay``) while its session lasts; the cloud's
    stop ends it. A lost cloud connection is redialed; a user that left closes its stream at the cloud."""
    timeout = config.runtime.request_timeout_s
    send = lambda message: session.request(message, timeout)  # noqa: E731

    def serve_session(cloud: Session) -> bool:
        try:
            while not session.closed.is_set():
                try:
                    message, _, request_id = cloud.receive(timeout=0.5)
                except DeviceLost:
                    if cloud.closed.is_set():
                        return False
                    continue
                if message.kind == "error" or is_stop(message):
                    session.send(message)  # a notice: nothing comes back
                    if is_stop(message):
                        return True
                    continue
                try:
                    reply = edge.relay(user, message, send)
                except MessageError as error:
                    reply = Message("error", edge.name, message.round, message.step,
                                    values={"reason": f"{edge.name}: {str(error)[:400]}"})
                cloud.send(reply, reply_to=request_id)
            return True  # the user left: its stream at the cloud closes
        except DeviceLost:  # the user left while a request was relayed
            return True
        finally:
            cloud.close("the user left" if session.closed.is_set() else "relay ended")
            edge.forget(user)

    try:
        keep_connected(config, config.runtime.address, user, token, f"edge {edge.index} (relay of user {user})",
                       f"runtime.edge_tokens[{edge.index}]", serve_session, seed=user, stop=stop)
    except (UnreachableError, RefusedError) as error:
        log.warning("%s", error)
        session.close(str(error))


# --- Ray ------------------------------------------------------------------------------------
def _edge_actors(tree: dict, topology: Topology, users: dict[int, ray.actor.ActorHandle]) -> dict[int, ray.actor.ActorHandle]:
    """One EdgeHost actor per edge worker of ``topology``; the actor each stream reaches: an edge's slot
    streams and its users' streams (which it relays to their host actors) both reach that edge."""
    reach = {}
    for worker in sorted(w for w in topology.workers() if topology.tier_of(w) == EDGE_TIER):
        routes = {u for s in topology.workers()[worker] for u in topology.routes_of(s.key)}
        actor = EdgeHost.options(num_cpus=0, max_concurrency=len(routes) + 8).remote(
            tree, edge_index(worker), {u: users[u] for u in routes})
        reach.update({u: actor for u in routes})
        reach.update({peer: actor for (w, _), peer in edge_peers(topology).items() if w == worker})
    return reach

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


@ray.remote
class EdgeHost:
    """An edge server in a Ray actor: its slots' endpoints, and the relay to its users' host actors.
    Threaded (``max_concurrency``): relays to different users and the slot streams run at the same time."""

    def __init__(self, config_tree: dict, index: int, users: dict[int, ray.actor.ActorHandle]) -> None:
        config = parse_config(config_tree)
        self.edge = host_edge(config, index)
        self.codec = message_codec(config)
        self.users = users
        self.slots = {endpoint.id: endpoint for endpoint in self.edge.slots.values()}
        self.timeout_s = config.runtime.request_timeout_s

    def call(self, peer: int, payload: bytes) -> bytes:
        """A request of the cloud on stream ``peer``: one of the edge's slots, or a user it relays."""
        try:
            request = decode(payload)
        except MessageError as error:
            return encode(Message("error", self.edge.name, 0, 0, values={"reason": str(error)[:500]}))
        if peer in self.slots:
            reply = respond(self.slots[peer], request, self.codec)
            return b"" if reply is None else encode(reply)
        if request.kind == "error" or is_stop(request):  # a notice for the user: nothing comes back
            self.users[peer].call.remote(peer, payload)
            return b""
        try:
            reply = self.edge.relay(peer, request, lambda message: self._send(peer, message))
        except (MessageError, DeviceLost) as error:
            reply = Message("error", self.edge.name, request.round, request.step,
                            values={"reason": f"{self.edge.name}: {str(error)[:400]}"})
        return encode(reply)

    def _send(self, user: int, message: Message) -> tuple[Message, int, int]:
        data = encode(message)
        try:
            reply = ray.get(self.users[user].call.remote(user, data), timeout=self.timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as error:
            raise DeviceLost(f"user {user}: {error}") from None
        return decode(reply), len(data), len(reply)


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
        reach = {u: actors[h] for h, devices in assignment.items() for u in devices}
        reach.update(_edge_actors(tree, run_topology(config)[1], dict(reach)))
        transport = RayTransport(reach)
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

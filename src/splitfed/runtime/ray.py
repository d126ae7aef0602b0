"""Ray runtime: simulated devices live in Ray actors spread over a cluster.

Each ``DeviceHost`` actor is one process that hosts many devices on one base stage model
(``runtime.hosting``) and keeps their state between forward and backward. The server
side runs the same engine and protocol as in-process; each device call becomes an actor
call carrying the project's encoded message bytes, checked on return like gRPC replies.

Local Ray for one machine; for several hosts start a cluster (``ray start --head`` on one,
``ray start --address HEAD:6379`` on the others) and set ``runtime.ray_address``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from splitfed.config import RunConfig
from splitfed.runtime.endpoint import respond
from splitfed.runtime.link import message_codec
from splitfed.runtime.remote import DeviceLost, remote_devices
from splitfed.wire.messages import Message, decode, encode

log = logging.getLogger("splitfed.ray")


@ray.remote
class DeviceHost:
    """One process hosting several devices; answers encoded requests with encoded replies."""

    def __init__(self, config_tree: dict, devices: list[int]) -> None:
        from splitfed.config import parse_config
        from splitfed.runtime.hosting import host_devices

        config = parse_config(config_tree)
        self.roles = host_devices(config, devices)
        self.codec = message_codec(config)

    def call(self, device: int, payload: bytes) -> bytes:
        reply = respond(self.roles[device], decode(payload), self.codec)
        return b"" if reply is None else encode(reply)


class RayTransport:
    """``runtime.remote.Transport`` over DeviceHost actors."""

    def __init__(self, hosts: dict[int, ray.actor.ActorHandle]) -> None:
        self.hosts = hosts

    def request(self, device: int, message: Message, timeout_s: float) -> tuple[Message, int, int]:
        payload = encode(message)
        try:
            reply = ray.get(self.hosts[device].call.remote(device, payload), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise DeviceLost(f"device {device}: no answer within {timeout_s:g} s") from None
        except ray.exceptions.RayActorError as error:
            raise DeviceLost(f"device {device}: host actor died: {error}") from None
        return decode(reply), len(payload), len(reply)

    def notify(self, device: int, message: Message) -> None:
        self.hosts[device].call.remote(device, encode(message))

    def wait_for(self, devices: list[int], timeout_s: float) -> list[int]:
        return devices  # host actors are restarted by Ray itself, not reconnected by us


def run_on_ray(config: RunConfig, out: Path, *, progress: bool = True, resume: bool = False) -> dict:
    """Run an experiment whose devices are Ray actors; returns the run summary."""
    from splitfed.run import run

    runtime = config.runtime
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=runtime.ray_address, include_dashboard=False, log_to_driver=False)
    try:
        count = config.devices.count
        hosts_wanted = runtime.ray_hosts or max(1, min(count, int(ray.available_resources().get("CPU", 1))))
        assignment = {h: [u for u in range(count) if u % hosts_wanted == h] for h in range(hosts_wanted)}
        tree = config.model_dump()
        actors = {h: DeviceHost.options(num_cpus=0).remote(tree, devices) for h, devices in assignment.items()}
        transport = RayTransport({u: actors[h] for h, devices in assignment.items() for u in devices})
        remote = remote_devices(config, transport)
        log.info("%d devices on %d Ray host actors", count, len(actors))
        return run(config, out, progress=progress, resume=resume, remote=remote)
    finally:
        if started_here:
            ray.shutdown()

"""Ray transport: requests to devices hosted in Ray actors spread over a cluster.

Each host actor (``splitfed.deploy.DeviceHost``) is one process that hosts many devices on one
base stage model and keeps their state between forward and backward. The server side runs the
same engine and protocol as in-process; each device call becomes an actor call carrying the
project's encoded message bytes, checked on return like gRPC replies.

Local Ray for one machine; for several hosts start a cluster (``ray start --head`` on one,
``ray start --address HEAD:6379`` on the others) and set ``runtime.ray_address``.
"""

from __future__ import annotations

import ray

from splitfed.runtime.remote import DeviceLost
from splitfed.wire.messages import Message, decode, encode


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

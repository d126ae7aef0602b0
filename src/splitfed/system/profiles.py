"""Device and server profiles: compute (FLOP/s), memory (bytes), radio (watts, metres).

The named classes are illustrative round numbers for sustained fp32 training throughput,
not measurements of particular products; ``population`` draws heterogeneous devices around
them with a seed. Units: FLOP/s, bytes, watts, metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GB = 1024**3


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops: float
    """Sustained training throughput, FLOP/s."""
    memory_bytes: float
    max_power_w: float
    """Maximum uplink transmit power over all its subchannels, watts."""
    distance_m: float
    """Distance to the base station (where the server is), metres."""


@dataclass(frozen=True)
class ServerProfile:
    name: str
    flops: float
    """Sustained training throughput, FLOP/s."""
    memory_bytes: float
    power_w: float
    """Downlink transmit power over all subchannels, watts."""


@dataclass(frozen=True)
class DeviceClass:
    """A class of devices: nominal profile and the range of distances it is found at."""

    flops: float
    memory_bytes: float
    max_power_w: float
    distance_m: tuple[float, float]


DEVICE_CLASSES: dict[str, DeviceClass] = {
    "phone": DeviceClass(flops=0.2e12, memory_bytes=6 * GB, max_power_w=0.2, distance_m=(50.0, 500.0)),
    "laptop": DeviceClass(flops=1e12, memory_bytes=16 * GB, max_power_w=0.2, distance_m=(20.0, 300.0)),
    "jetson": DeviceClass(flops=2e12, memory_bytes=8 * GB, max_power_w=0.5, distance_m=(20.0, 300.0)),
    "edge_server": DeviceClass(flops=10e12, memory_bytes=64 * GB, max_power_w=1.0, distance_m=(10.0, 100.0)),
}

SERVERS: dict[str, ServerProfile] = {
    "edge_server": ServerProfile("edge_server", flops=10e12, memory_bytes=64 * GB, power_w=1.0),
    "gpu_server": ServerProfile("gpu_server", flops=100e12, memory_bytes=80 * GB, power_w=10.0),
}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(table)}")
    return table[name]


def server_profile(name: str) -> ServerProfile:
    return _lookup(SERVERS, name, "server profile")


def population(count: int, seed: int, classes: list[str] | None = None, spread: float = 0.25) -> list[DeviceProfile]:
    """``count`` devices: classes cycled from ``classes`` (or drawn uniformly from all classes),
    distance uniform in the class range, FLOP/s scaled by a log-normal factor (sigma ``spread``)."""
    rng = np.random.default_rng(seed)
    names = [classes[u % len(classes)] for u in range(count)] if classes else list(rng.choice(list(DEVICE_CLASSES), count))
    devices = []
    for u, name in enumerate(names):
        cls = _lookup(DEVICE_CLASSES, str(name), "device class")
        low, high = cls.distance_m
        devices.append(
            DeviceProfile(
                name=f"{name}{u}",
                flops=cls.flops * float(rng.lognormal(0.0, spread)),
                memory_bytes=cls.memory_bytes,
                max_power_w=cls.max_power_w,
                distance_m=float(rng.uniform(low, high)),
            )
        )
    return devices

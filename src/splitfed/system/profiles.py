"""Device and server profiles: compute (FLOP/s), memory (bytes), radio (watts, metres).

The named classes are illustrative round numbers for sustained fp32 training throughput,
not measurements of particular products; ``population`` draws heterogeneous devices around
them with a seed. Units: FLOP/s, bytes, watts, metres.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
    head_flops: float | None = None
    """FLOP/s of the LM head and loss, timed alone (measured profiles): None, as ``flops``."""


@dataclass(frozen=True)
class ServerProfile:
    name: str
    flops: float
    """Sustained training throughput, FLOP/s."""
    memory_bytes: float
    power_w: float
    """Downlink transmit power over all subchannels, watts."""
    head_flops: float | None = None
    """FLOP/s of the LM head and loss, timed alone (measured profiles): None, as ``flops``."""


@dataclass(frozen=True)
class DeviceClass:
    """A class of devices: nominal profile and the range of distances it is found at."""

    flops: float
    memory_bytes: float
    max_power_w: float
    distance_m: tuple[float, float]
    measured: bool = False
    """A profile measured on a machine (``splitfed profile``): its devices get its FLOP/s, not a spread around it."""
    head_flops: float | None = None
    """FLOP/s of the LM head and loss, timed alone (measured profiles): None, as ``flops``."""


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


PROFILE_KIND = "splitfed-profile"
"""The ``kind`` of a profile file written by ``splitfed profile``."""


def is_profile_file(name: str) -> bool:
    """A device class or server named by the path of a measured profile (``*.json``) instead of a table name."""
    return name.endswith(".json")


def load_profile(path: str) -> DeviceClass:
    """The measured profile at ``path`` as a device class; ValueError naming the file and what is wrong."""
    try:
        return _load_profile(path, Path(path).stat().st_mtime_ns)  # read once per version of the file
    except OSError as error:
        raise ValueError(f"profile file {path!r}: {error.strerror}") from None


@lru_cache(maxsize=64)
def _load_profile(path: str, version: int) -> DeviceClass:
    try:
        tree = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"profile file {path!r}: {error}") from None
    if not isinstance(tree, dict) or tree.get("kind") != PROFILE_KIND:
        raise ValueError(f"profile file {path!r} is not a splitfed profile (write one with `splitfed profile`)")
    values = {}
    for key in ("flops", "memory_bytes", "max_power_w"):
        value = tree.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"profile file {path!r}: {key} is {value!r}; allowed: a number > 0")
        values[key] = float(value)
    distance = tree.get("distance_m")
    if (not isinstance(distance, list) or len(distance) != 2 or not all(isinstance(d, int | float) for d in distance)
            or not 0 < distance[0] <= distance[1]):
        raise ValueError(f"profile file {path!r}: distance_m is {distance!r}; allowed: [low, high] metres, 0 < low <= high")
    head = tree.get("head_flops")  # profiles written before the head was timed have none
    if head is not None and (not isinstance(head, int | float) or isinstance(head, bool) or not head > 0):
        raise ValueError(f"profile file {path!r}: head_flops is {head!r}; allowed: a number > 0, or absent")
    return DeviceClass(values["flops"], values["memory_bytes"], values["max_power_w"], (float(distance[0]),
                       float(distance[1])), measured=True, head_flops=None if head is None else float(head))


def _lookup(table: dict, name: str, what: str):
    if is_profile_file(name):
        return load_profile(name)
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(table)}, or a profile file (*.json)")
    return table[name]


def server_profile(name: str) -> ServerProfile:
    """A server profile from the table, or measured (a profile file: its FLOP/s and memory; 1 W downlink)."""
    found = _lookup(SERVERS, name, "server profile")
    if isinstance(found, DeviceClass):
        return ServerProfile(name, found.flops, found.memory_bytes, power_w=1.0, head_flops=found.head_flops)
    return found


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
                name=f"{Path(name).stem if is_profile_file(name) else name}{u}",
                flops=cls.flops * (1.0 if cls.measured else float(rng.lognormal(0.0, spread))),
                memory_bytes=cls.memory_bytes,
                max_power_w=cls.max_power_w,
                distance_m=float(rng.uniform(low, high)),
                head_flops=cls.head_flops,  # only measured classes have one, and they are not spread
            )
        )
    return devices

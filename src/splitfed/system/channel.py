"""OFDMA wireless channel: subchannels of bandwidth W (Hz), path loss, Rayleigh fading, rates.

The rate of device u is the sum over its subchannels s of W * log2(1 + p_s * g_us / (N0 * W))
in bit/s, with p_s the power on s (watts), g_us the channel gain (path loss x fading) and N0
the noise power spectral density (W/Hz). Each subchannel serves one device. Path loss is the
3GPP urban macro model 128.1 + 37.6 log10(d / km) dB; Rayleigh fading multiplies the gain by
an Exp(1) power drawn independently per device, subchannel and draw (round or slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


def path_gain(distance_m: np.ndarray | float) -> np.ndarray:
    """Linear power gain of the path loss at ``distance_m`` metres."""
    distance_km = np.maximum(np.asarray(distance_m, dtype=float), 1.0) / 1000.0
    return 10.0 ** (-(128.1 + 37.6 * np.log10(distance_km)) / 10.0)


def dbm_to_watts(dbm: float) -> float:
    return 10.0 ** (dbm / 10.0) / 1000.0


@dataclass(frozen=True)
class Channel:
    subchannels: int
    bandwidth_hz: float
    """Bandwidth W of each subchannel, Hz."""
    noise_dbm_per_hz: float = -174.0
    fading: Literal["rayleigh", "none"] = "rayleigh"

    @property
    def noise_w_per_hz(self) -> float:
        return dbm_to_watts(self.noise_dbm_per_hz)

    def gains(self, distances_m: list[float], rng: np.random.Generator) -> np.ndarray:
        """Channel power gains (devices, subchannels) for one draw of the fading."""
        mean = path_gain(np.asarray(distances_m))[:, None] * np.ones((len(distances_m), self.subchannels))
        if self.fading == "rayleigh":
            return mean * rng.exponential(1.0, size=mean.shape)
        return mean

    def rates(self, gains: np.ndarray, assignment: np.ndarray, power_w: np.ndarray) -> np.ndarray:
        """Rate of every device, bit/s.

        gains: (devices, subchannels); assignment: (subchannels,) the device each subchannel serves
        (-1: unused); power_w: (subchannels,) transmit power on each subchannel, watts.
        """
        used = assignment >= 0
        snr = np.zeros(self.subchannels)
        snr[used] = power_w[used] * gains[assignment[used], np.flatnonzero(used)] / (self.noise_w_per_hz * self.bandwidth_hz)
        per_subchannel = self.bandwidth_hz * np.log2(1.0 + snr)
        return np.bincount(assignment[used], weights=per_subchannel[used], minlength=gains.shape[0])


def equal_assignment(devices: int, subchannels: int) -> np.ndarray:
    """Subchannels dealt round-robin: device u gets s = u, u + n, u + 2n, ..."""
    if subchannels < devices:
        raise ValueError(f"{subchannels} subchannels cannot give each of {devices} devices one subchannel")
    return np.arange(subchannels) % devices


def split_power(assignment: np.ndarray, total_w: np.ndarray) -> np.ndarray:
    """Each device's total power ``total_w[u]`` split equally over its subchannels (watts each)."""
    counts = np.bincount(assignment[assignment >= 0], minlength=len(total_w))
    power = np.zeros(len(assignment))
    used = assignment >= 0
    power[used] = total_w[assignment[used]] / counts[assignment[used]]
    return power

"""Spectrum and power allocation for one channel realisation (one round's fading draw).

* ``slsqp_shares``: continuous subchannel shares that minimise the slowest device's round
  time, min t s.t. t >= T_u(n_u), sum n_u <= S, n_u >= 1, with scipy's SLSQP (sequential
  quadratic programming, SFT's fast timescale). T_u(n) = a_u + B_up,u / R_up,u(n) +
  B_down,u / R_down,u(n), with R_up(n) = n W log2(1 + P_u g_u / (n N0 W)) (power split over
  n subchannels of the device's mean gain) and R_down(n) = n W log2(1 + p_s g_u / (N0 W)).
* ``draft``: integer subchannels from the shares (largest remainders), then devices pick
  their best remaining subchannels in turns, neediest first.
* ``greedy_assignment``: FedsLLM's greedy: every device gets its best subchannel, then each
  remaining subchannel goes to the currently slowest device (its best free one).
* ``water_filling``: FedsLLM's power control: each device's powers maximise its rate under its
  total and per-subchannel limits (the problem is convex; water level found by bisection).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

LN2 = np.log(2.0)


@dataclass(frozen=True)
class Needs:
    """What each device must do in a round (arrays over devices)."""

    compute_s: np.ndarray
    """a_u: seconds of computing."""
    up_bits: np.ndarray
    down_bits: np.ndarray
    up_snr: np.ndarray
    """P_u g_u / (N0 W): uplink SNR with all its power on one subchannel of its mean gain."""
    down_snr: np.ndarray
    """p_s g_u / (N0 W): downlink SNR of one subchannel (server power split over all)."""
    bandwidth_hz: float

    def time(self, n: np.ndarray) -> np.ndarray:
        w = self.bandwidth_hz
        up = n * w * np.log2(1.0 + self.up_snr / n)
        down = n * w * np.log2(1.0 + self.down_snr)
        return self.compute_s + self.up_bits / up + self.down_bits / down

    def time_grad(self, n: np.ndarray) -> np.ndarray:
        w = self.bandwidth_hz
        x = self.up_snr / n
        up = n * w * np.log2(1.0 + x)
        d_up = w * (np.log2(1.0 + x) - x / ((1.0 + x) * LN2))
        down_per = w * np.log2(1.0 + self.down_snr)
        return -self.up_bits * d_up / up**2 - self.down_bits / (n**2 * down_per)


def slsqp_shares(needs: Needs, subchannels: int) -> np.ndarray:
    """Continuous subchannel counts (devices,) >= 1 summing to at most ``subchannels``."""
    n = len(needs.compute_s)
    if subchannels < n:
        raise ValueError(f"{subchannels} subchannels cannot give each of {n} devices one")
    x0 = np.append(water_level(needs, subchannels), 0.0)  # warm start: SLSQP then only polishes
    x0[-1] = needs.time(x0[:n]).max()
    scale = max(x0[-1], 1e-9)  # optimise t / scale so the objective is O(1)
    x0[-1] /= scale

    def slack(x: np.ndarray) -> np.ndarray:
        return np.append(x[-1] - needs.time(x[:n]) / scale, subchannels - x[:n].sum())

    def slack_jac(x: np.ndarray) -> np.ndarray:
        jac = np.zeros((n + 1, n + 1))
        jac[np.arange(n), np.arange(n)] = -needs.time_grad(x[:n]) / scale
        jac[:n, -1] = 1.0
        jac[n, :n] = -1.0
        return jac

    result = minimize(
        lambda x: x[-1], x0, jac=lambda x: np.eye(n + 1)[-1], method="SLSQP",
        bounds=[(1.0, float(subchannels))] * n + [(0.0, None)],
        constraints=[{"type": "ineq", "fun": slack, "jac": slack_jac}], options={"maxiter": 200, "ftol": 1e-9},
    )
    shares = np.clip(result.x[:n], 1.0, subchannels)
    return shares * min(1.0, subchannels / shares.sum())


def water_level(needs: Needs, subchannels: int) -> np.ndarray:
    """Shares that equalise the devices' times: bisection on the common time t, each device
    getting the least n >= 1 with T_u(n) <= t (T_u decreases in n), scaled to sum to S."""
    n = len(needs.compute_s)

    def least(t: float) -> np.ndarray:
        low, high = np.ones(n), np.full(n, float(subchannels))
        for _ in range(30):
            mid = (low + high) / 2
            fast = needs.time(mid) <= t
            high, low = np.where(fast, mid, high), np.where(fast, low, mid)
        return np.where(needs.time(np.ones(n)) <= t, 1.0, high)

    low, high = float(needs.time(np.full(n, float(subchannels))).max()), float(needs.time(np.ones(n)).max())
    for _ in range(30):
        mid = (low + high) / 2
        if least(mid).sum() > subchannels:
            low = mid
        else:
            high = mid
    shares = least(high)
    return shares * min(1.0, subchannels / shares.sum())


def draft(shares: np.ndarray, gains: np.ndarray, needs: Needs) -> np.ndarray:
    """Owner of each subchannel: counts from ``shares`` (largest remainders), then the device
    with the largest remaining need picks its best free subchannel (by uplink gain), in turns."""
    n, subchannels = gains.shape
    counts = np.maximum(np.floor(shares).astype(int), 1)
    left = subchannels - counts.sum()
    if left > 0:
        counts[np.argsort(-(shares - np.floor(shares)))[:left]] += 1
    while counts.sum() > subchannels:  # floor(1) minimums can overshoot
        counts[np.argmax(counts)] -= 1
    owners = np.full(subchannels, -1)
    free = np.ones(subchannels, dtype=bool)
    order = np.argsort(-needs.time(np.maximum(counts, 1).astype(float)))
    remaining = counts.copy()
    while remaining.sum() > 0:
        for u in order:
            if remaining[u]:
                s = int(np.argmax(np.where(free, gains[u], -np.inf)))
                owners[s], free[s] = u, False
                remaining[u] -= 1
    return owners


def greedy_assignment(needs: Needs, up_gains: np.ndarray, max_power_w: np.ndarray, noise_w: float) -> np.ndarray:
    """FedsLLM greedy: one best subchannel per device (slowest first), then each remaining
    subchannel to the device that is currently slowest. ``noise_w``: N0 W."""
    n, subchannels = up_gains.shape
    if subchannels < n:
        raise ValueError(f"{subchannels} subchannels cannot give each of {n} devices one")
    owners = np.full(subchannels, -1)
    free = np.ones(subchannels, dtype=bool)
    mine: list[list[int]] = [[] for _ in range(n)]

    def device_time(u: int) -> float:
        k = len(mine[u])
        up = needs.bandwidth_hz * np.log2(1.0 + max_power_w[u] / k * up_gains[u, mine[u]] / noise_w).sum()
        down = k * needs.bandwidth_hz * np.log2(1.0 + needs.down_snr[u])
        return needs.compute_s[u] + needs.up_bits[u] / up + needs.down_bits[u] / down

    def give(u: int) -> None:
        s = int(np.argmax(np.where(free, up_gains[u], -np.inf)))
        owners[s], free[s] = u, False
        mine[u].append(s)

    for u in np.argsort(-needs.time(np.ones(n))):
        give(int(u))
    times = np.array([device_time(u) for u in range(n)])
    for _ in range(subchannels - n):
        u = int(np.argmax(times))
        give(u)
        times[u] = device_time(u)
    return owners


def water_filling(owners: np.ndarray, gains: np.ndarray, max_power_w: np.ndarray, noise_w: float,
                  cap_w: float | None = None) -> np.ndarray:
    """Uplink watts per subchannel maximising each device's rate sum_s log2(1 + p_s g_s / N0W)
    under sum_s p_s <= P_u and p_s <= ``cap_w``: p_s = clip(level - N0W / g_s, 0, cap)."""
    power = np.zeros(len(owners))
    for u in range(len(max_power_w)):
        mine = np.flatnonzero(owners == u)
        if not len(mine):
            continue
        floor = noise_w / gains[u, mine]
        cap = np.inf if cap_w is None else cap_w
        if cap * len(mine) <= max_power_w[u]:  # every subchannel at its limit fits the budget
            power[mine] = cap
            continue
        low, high = 0.0, floor.max() + max_power_w[u]
        for _ in range(60):
            level = (low + high) / 2
            if np.clip(level - floor, 0.0, cap).sum() > max_power_w[u]:
                high = level
            else:
                low = level
        power[mine] = np.clip(low - floor, 0.0, cap)
    return power

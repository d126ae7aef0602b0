"""Per-round spectrum allocation on a Problem: what each device needs, and SLSQP subchannels.

Shared by ``sft`` (its fast timescale) and ``bandwidth_only``; ``fedsllm`` uses the same
``needs`` with its greedy assignment and water-filling.
"""

from __future__ import annotations

import numpy as np

from splitfed.planning.allocate import Needs, draft, slsqp_shares, water_level
from splitfed.planning.problem import BITS, Loads, Problem


def round_needs(problem: Problem, loads: Loads, round_index: int) -> Needs:
    """Per-device computing seconds and bits of a round, and SNRs at the device's mean gain this round."""
    up_gains, down_gains = problem.gains[round_index]
    noise = problem.channel.noise_w_per_hz * problem.channel.bandwidth_hz
    max_power = np.array([d.max_power_w for d in problem.devices])
    down_power = problem.server.power_w / problem.channel.subchannels
    steps = problem.steps
    return Needs(
        compute_s=steps * (loads.forward_s + loads.backward_s),
        up_bits=BITS * (steps * (loads.up_step + loads.norm) + loads.upload),
        down_bits=BITS * (steps * (loads.down_step + loads.clip) + loads.download),
        up_snr=max_power * up_gains.mean(axis=1) / noise,
        down_snr=down_power * down_gains.mean(axis=1) / noise,
        bandwidth_hz=problem.channel.bandwidth_hz,
    )


def slsqp_owners(problem: Problem, protocol: str, loads: Loads, round_index: int, polish: bool = True) -> np.ndarray:
    """Subchannel owners of a round from SLSQP shares (``polish=False``: from its warm start, the
    equal-time water level, which is enough between slow-timescale passes); the round-robin split
    if that is faster."""
    needs = round_needs(problem, loads, round_index)
    subchannels = problem.channel.subchannels
    shares = slsqp_shares(needs, subchannels) if polish else water_level(needs, subchannels)
    owners = draft(shares, problem.gains[round_index][0], needs)
    equal = problem.equal_owners()
    planned = problem.round_delay(protocol, loads, *problem.rates(round_index, owners, None))
    baseline = problem.round_delay(protocol, loads, *problem.rates(round_index, equal, None))
    return owners if planned <= baseline else equal

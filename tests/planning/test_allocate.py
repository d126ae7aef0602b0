"""Spectrum and power allocation: constraints hold, and each is at least as good as the equal split."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.planning.allocate import Needs, draft, greedy_assignment, slsqp_shares, water_filling, water_level
from splitfed.planning.convergence import StepsModel, fit_steps_model, steps_to_reach
from splitfed.system.channel import Channel


def _needs(n: int, seed: int) -> Needs:
    rng = np.random.default_rng(seed)
    return Needs(
        compute_s=rng.uniform(0.1, 2.0, n), up_bits=rng.uniform(1e6, 5e7, n), down_bits=rng.uniform(1e6, 5e7, n),
        up_snr=10 ** rng.uniform(-1, 4, n), down_snr=10 ** rng.uniform(0, 4, n), bandwidth_hz=1e6,
    )


@pytest.mark.parametrize("n, subchannels, seed", [(2, 2, 0), (3, 8, 1), (5, 16, 2), (10, 40, 3), (30, 64, 4)])
def test_slsqp_shares_satisfy_the_constraints_and_equalise_times(n, subchannels, seed):
    needs = _needs(n, seed)
    shares = slsqp_shares(needs, subchannels)
    assert np.all(shares >= 1 - 1e-9) and shares.sum() <= subchannels * (1 + 1e-9)
    equal = needs.time(np.full(n, subchannels / n)).max()
    assert needs.time(shares).max() <= equal * (1 + 1e-9)
    # Optimal min-max: at most as slow as the bisection water level, and the analytic gradient is right.
    assert needs.time(shares).max() <= needs.time(water_level(needs, subchannels)).max() * (1 + 1e-6)
    x, h = shares + 0.5, 1e-4
    numeric = (needs.time(x + h) - needs.time(x - h)) / (2 * h)
    assert needs.time_grad(x) == pytest.approx(numeric, rel=1e-3)


@pytest.mark.parametrize("n, subchannels, seed", [(3, 3, 0), (4, 10, 1), (8, 33, 2)])
def test_draft_and_greedy_give_every_subchannel_to_one_device(n, subchannels, seed):
    needs = _needs(n, seed)
    gains = np.random.default_rng(seed).exponential(1e-12, (n, subchannels))
    for owners in (draft(slsqp_shares(needs, subchannels), gains, needs),
                   greedy_assignment(needs, gains, np.full(n, 0.2), 1e-15)):
        assert owners.shape == (subchannels,) and np.all((owners >= 0) & (owners < n))
        assert set(owners.tolist()) == set(range(n))  # every device gets at least one


@pytest.mark.parametrize("cap", [None, 0.01, 0.05, 1.0])
def test_water_filling_respects_limits_and_beats_the_equal_split(cap):
    rng = np.random.default_rng(7)
    n, subchannels = 4, 16
    channel = Channel(subchannels, 1e6)
    gains = channel.gains(list(rng.uniform(20, 400, n)), rng)
    owners = np.arange(subchannels) % n
    max_power = np.array([0.2, 0.2, 0.5, 1.0])
    noise = channel.noise_w_per_hz * channel.bandwidth_hz
    power = water_filling(owners, gains, max_power, noise, cap)
    totals = np.bincount(owners, weights=power, minlength=n)
    assert np.all(power >= 0) and np.all(totals <= max_power * (1 + 1e-9))
    if cap is not None:
        assert np.all(power <= cap + 1e-15)
    equal = np.minimum(max_power[owners] / 4, cap if cap is not None else np.inf)
    assert np.all(channel.rates(gains, owners, power) >= channel.rates(gains, owners, equal) * (1 - 1e-9))


def test_convergence_fit_recovers_known_constants():
    truth = StepsModel(a=6.0, b=12.0)
    ranks = [2, 4, 8, 16]
    a, b = fit_steps_model(ranks, [truth.steps(r) for r in ranks])
    assert (a, b) == pytest.approx((6.0, 12.0))
    assert steps_to_reach([3.0, 2.0, 1.0], 1.5) == pytest.approx(1.5)
    assert steps_to_reach([3.0, 2.9], 1.0) == 1.0  # never reached: the curve's length
    assert truth.rounds(2, local_steps=4) == pytest.approx(3.0) and truth.rounds(16, 100) == 1.0


FITTED_ON = (("protocol", "sfl"), ("devices", 4), ("batch_size", 2), ("seq_len", 64), ("local_steps", 3), ("lr", 2e-3))


@pytest.mark.parametrize(("ranks", "workload", "expected"), [
    ([8, 8], FITTED_ON, []),
    ([2, 16], FITTED_ON, []),  # the ends of the fitted range are not extrapolation
    ([32, 8], FITTED_ON, ["rounds(rank) extrapolates to rank 32: fitted on ranks 2, 4, 8, 16"]),
    ([1], FITTED_ON, ["rounds(rank) extrapolates to rank 1: fitted on ranks 2, 4, 8, 16"]),
    ([8], (("protocol", "memsfl"), *FITTED_ON[1:4], ("local_steps", 5), FITTED_ON[5]),
     ["rounds(rank) was fitted on another workload: protocol memsfl (fitted: sfl); local_steps 5 (fitted: 3)"]),
])
def test_convergence_model_says_where_it_extrapolates(ranks, workload, expected):
    model = StepsModel(a=4.0, b=16.0, ranks=(2, 4, 8, 16), error=1.5, workload=FITTED_ON)
    assert model.notes(ranks, workload) == expected

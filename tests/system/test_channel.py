"""The channel's rate is the OFDMA formula; profiles and fading are seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitfed.system.channel import Channel, equal_assignment, path_gain, split_power
from splitfed.system.profiles import DEVICE_CLASSES, population


@pytest.mark.parametrize(
    "assignment, power, expected_bits",
    [
        # device 0 on subchannels 0 and 2, device 1 on subchannel 1; W = 1 MHz, N0 W = 1e-15 W
        ([0, 1, 0], [1e-3, 2e-3, 1e-3], [1e6 * (math.log2(1 + 1e-3 * 1e-9 / 1e-15) + math.log2(1 + 1e-3 * 3e-9 / 1e-15)),
                                          1e6 * math.log2(1 + 2e-3 * 2e-9 / 1e-15)]),
        ([1, -1, -1], [0.5, 9.0, 9.0], [0.0, 1e6 * math.log2(1 + 0.5 * 4e-9 / 1e-15)]),  # unused subchannels carry nothing
    ],
)
def test_rate_is_sum_of_shannon_rates_over_subchannels(assignment, power, expected_bits):
    channel = Channel(3, 1e6, 10 * math.log10(1e-21 * 1000), "none")  # N0 = 1e-21 W/Hz, N0 W = 1e-15 W
    gains = np.array([[1e-9, 5e-9, 3e-9], [4e-9, 2e-9, 6e-9]])
    rates = channel.rates(gains, np.array(assignment), np.array(power))
    np.testing.assert_allclose(rates, expected_bits, rtol=1e-12)


def test_path_loss_fading_and_allocation():
    assert 10 * math.log10(path_gain(1000.0)) == pytest.approx(-128.1)
    channel = Channel(64, 1e6)
    gains = channel.gains([100.0, 400.0], np.random.default_rng(0))
    assert gains.shape == (2, 64)
    assert np.mean(gains[0]) == pytest.approx(path_gain(100.0), rel=0.35)  # Exp(1) fading has mean 1
    np.testing.assert_array_equal(gains, channel.gains([100.0, 400.0], np.random.default_rng(0)))
    assignment = equal_assignment(3, 7)
    assert list(assignment) == [0, 1, 2, 0, 1, 2, 0]
    np.testing.assert_allclose(split_power(assignment, np.array([0.3, 0.2, 0.2])), [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="2 subchannels cannot give each of 3 devices one subchannel"):
        equal_assignment(3, 2)


def test_population_is_seeded_and_heterogeneous():
    devices = population(8, seed=1, classes=["phone", "jetson"])
    assert devices == population(8, seed=1, classes=["phone", "jetson"])
    assert [d.name for d in devices[:3]] == ["phone0", "jetson1", "phone2"]
    for d in devices:
        low, high = DEVICE_CLASSES[d.name.rstrip("0123456789")].distance_m
        assert low <= d.distance_m <= high
    assert len({d.flops for d in devices}) == 8
    assert {d.name.rstrip("0123456789") for d in population(40, seed=2)} == set(DEVICE_CLASSES)
    with pytest.raises(ValueError, match="unknown device class 'toaster'"):
        population(2, seed=0, classes=["toaster"])

"""Seeds derived from the run seed: one independent stream per (purpose, index), so adding a
consumer of randomness never shifts the draws of another."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    """What a derived seed is for (the values are part of every run's numbers: never renumber)."""

    BATCHES = 1
    """A first-stage slot's batch stream (index: device)."""
    PARTICIPANTS = 2
    """Which devices take part in a round (index: round)."""
    CODEC = 3
    """Stochastic codecs of the wire."""
    SCHEDULE = 4
    """The random serving order (index: step)."""
    ADAPTER_RESTART = 6
    """The global adapter after merge k of a merging aggregation (index: k)."""
    CODEC_CALIBRATION = 7
    """The planners' codec calibration (index: its documents 0, its batches 1, codec draws 2 and batch, cut,
    stream, pipeline)."""


def derive_seed(seed: int, purpose: Purpose, *index: int) -> int:
    """An independent 63-bit seed for each (run seed, purpose, index) tuple."""
    parts = [seed, int(purpose), *index]
    return int(np.random.SeedSequence(parts).generate_state(2, dtype=np.uint64)[0] >> 1)

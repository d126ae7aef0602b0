"""Seeds derived from the run seed: one independent stream per (purpose, index), so adding a
consumer of randomness never shifts the draws of another."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """An independent 63-bit seed for each (run seed, purpose, index) tuple."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)

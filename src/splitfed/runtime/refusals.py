"""Bounded bookkeeping of refused connections and messages: a count and a small sample.

A flood of bad input must not grow memory or logs without bound: each refusal is counted,
the first few reasons are kept and logged, then only one line per ``every`` refusals.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("splitfed.refused")


class Tally:
    """Counts refusals of one kind; keeps the first few reasons and logs them, then one line per ``every``.

    Memory and log volume stay bounded however many refusals a flood causes."""

    def __init__(self, what: str, sample: int = 10, every: int = 1000) -> None:
        self.what = what
        self.count = 0
        self.sample: list[str] = []
        self._limit, self._every = sample, every
        self._lock = threading.Lock()

    def add(self, reason: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.sample) < self._limit:
                self.sample.append(reason)
            count = self.count
        if count <= self._limit:
            log.warning("%s: refused: %s", self.what, reason)
        elif count % self._every == 0:
            log.warning("%s: %d refused so far (the first %d are logged above)", self.what, count, self._limit)

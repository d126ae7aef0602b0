"""Baseline planners: what the optimisers are measured against.

* ``equal``: the configured cuts (devices.cuts, or the deepest that fits devices.memory_mb),
  subchannels dealt round-robin, each device's power split equally, no compression.
* ``cut_only``: equal spectrum and no compression; cuts chosen by sft's slow timescale
  (one common cut, or per device with the configured protocol's ``per_device_cuts``).
* ``bandwidth_only``: the configured cuts, no compression; subchannels per round by sft's
  fast timescale (SLSQP).
"""

from __future__ import annotations

from splitfed.planning.problem import Decision, PlanOptions, Problem
from splitfed.planning.sft import fast_timescale, solve


def equal(problem: Problem, options: PlanOptions) -> Decision:
    """The configured setup, unoptimised."""
    return problem.equal_decision()


def cut_only(problem: Problem, options: PlanOptions) -> Decision:
    """Cuts only (sft's slow timescale with the codec ladder reduced to ``none``)."""
    return solve(problem, ("none",), 0.0, 0.0, allocate=False)


def bandwidth_only(problem: Problem, options: PlanOptions) -> Decision:
    """Subchannels only (sft's fast timescale on the configured cuts)."""
    return fast_timescale(problem, problem.equal_decision())

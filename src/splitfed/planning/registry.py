"""The named planners and ``make_plan``, which runs one and predicts its run.

A planner is any callable ``(Problem, PlanOptions) -> Decision``; add your own with
``PLANNERS["mine"] = my_planner`` (or ``register``) and ``splitfed plan --planner mine`` finds it
once the module defining it is imported (e.g. from your own entry point).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from transformers import PretrainedConfig

from splitfed.config import RunConfig
from splitfed.planning.baselines import bandwidth_only, cut_only, equal
from splitfed.planning.calibrate import CodecCalibration
from splitfed.planning.convergence import FITTED, workload_of
from splitfed.planning.fedsllm import fedsllm
from splitfed.planning.plan import Plan
from splitfed.planning.predict import predict
from splitfed.planning.problem import Decision, PlanOptions, Problem
from splitfed.planning.sft import sft
from splitfed.registry import protocol_class

Planner = Callable[[Problem, PlanOptions], Decision]

PLANNERS: dict[str, Planner] = {
    "sft": sft,
    "fedsllm": fedsllm,
    "equal": equal,
    "cut_only": cut_only,
    "bandwidth_only": bandwidth_only,
}


def register(name: str) -> Callable[[Planner], Planner]:
    """Decorator: make a planner available as ``name``."""

    def add(planner: Planner) -> Planner:
        PLANNERS[name] = planner
        return planner

    return add


def _measured_errors(problem: Problem, stream: str, specs: list[str], cuts: np.ndarray) -> list[dict[str, float]]:
    """Per device: the measured errors of its pipeline on ``stream`` at its cut."""
    return [{"tensor": e.tensor, "token_median": e.token_median} for e in problem.codec_errors(stream, specs, cuts)]


def to_plan(problem: Problem, decision: Decision, name: str) -> Plan:
    """A decision written as a plan (explicit per-round owners; power only if the planner set it), with
    the measured errors of its pipelines."""
    owners = decision.owners or [problem.equal_owners()] * problem.rounds
    protocol, config = protocol_class(decision.protocol), problem.config_for(decision.protocol)
    problem.measure([*decision.activations, *decision.gradients])
    return Plan(
        planner=name,
        protocol=decision.protocol,
        cuts=[int(c) for c in decision.cuts],
        ranks=[int(r) for r in decision.ranks],
        activations=list(decision.activations),
        gradients=list(decision.gradients),
        activation_errors=_measured_errors(problem, "activations", decision.activations, decision.cuts),
        gradient_errors=_measured_errors(problem, "gradients", decision.gradients, decision.cuts),
        subchannels=problem.channel.subchannels,
        subchannel_hz=problem.channel.bandwidth_hz,
        subchannel_owner=[[int(u) for u in row] for row in owners],
        power_w=[[float(p) for p in np.round(row, 12)] for row in decision.power] if decision.power else [],
        scheduler=protocol.scheduler(config),
        one_at_a_time=protocol.scheduled(config) or not protocol.serves_together(config),
        device_names=[d.name for d in problem.devices],
    )


def make_plan(config: RunConfig, model_config: PretrainedConfig, planner: str = "sft",
              options: PlanOptions | None = None, calibration: CodecCalibration | None = None,
              progress: Callable[[str], None] | None = None) -> Plan:
    """Run planner ``planner`` on ``config`` and predict the planned run's delay and memory.

    ``calibration``: measured codec errors to use (``planning.calibrate.calibrate_codecs``, e.g. one for
    many plans of a model and data); None: measured on ``config``'s model and data when the planner
    first needs a lossy pipeline's error (sft does), with ``progress`` getting its progress lines."""
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; allowed: {', '.join(PLANNERS)}")
    options = options or PlanOptions()
    started = time.perf_counter()
    problem = Problem(config, model_config, calibration, progress)
    plan = to_plan(problem, PLANNERS[planner](problem, options), planner)
    plan.solve_s = time.perf_counter() - started - problem.calibration_s
    prediction = predict(plan.apply(config), model_config)
    plan.round_s = prediction.round_s
    plan.first_order = prediction.first_order
    plan.device_memory_bytes = prediction.device_memory_bytes
    plan.server_memory_bytes = prediction.server_memory_bytes
    plan.rounds_needed = FITTED.rounds(max(plan.ranks), config.train.local_steps)
    plan.notes = FITTED.notes(plan.ranks, workload_of(config))
    return plan

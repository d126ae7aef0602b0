"""Planners: feasible plans, never slower than the equal baseline, clear errors, JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest

from splitfed.config import parse_config
from splitfed.planning.convergence import FITTED
from splitfed.planning.fedsllm import total_delay
from splitfed.planning.plan import Plan
from splitfed.planning.problem import MB, PlanError, PlanOptions, Problem
from splitfed.planning.registry import PLANNERS, make_plan, register
from splitfed.system import profiles
from splitfed.system.costs import device_memory_bytes, layer_costs
from tests.conftest import TINY_CONFIGS

MODEL = TINY_CONFIGS["llama"]()


def _config(protocol: str, count: int, seed: int, **system) -> object:
    """A random heterogeneous instance: memory budgets that bind (1..5 layers of the tiny model). The
    tests plan for MODEL's architecture and pass the tiny model's codec calibration, so the configured
    model is never loaded."""
    rng = np.random.default_rng(seed)
    costs = layer_costs(MODEL, ["q_proj", "v_proj"])
    budgets = [device_memory_bytes(costs, int(k), 4, 4, 32) / MB * 1.01 for k in rng.integers(1, 6, count)]
    tree = {
        "protocol": protocol, "seed": seed,
        "lora": {"rank": 4},
        "train": {"rounds": 2, "local_steps": 2, "batch_size": 4, "seq_len": 32},
        "devices": {"count": count, "memory_mb": budgets},
        "system": {"subchannels": 2 * count, "device_classes": ["phone", "laptop", "jetson", "edge_server"], **system},
    }
    return parse_config(tree)


INSTANCES = [(protocol, count, seed) for protocol in ("sfl", "memsfl") for count in (2, 5) for seed in range(3)]


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@pytest.mark.parametrize("protocol, count, seed", INSTANCES[:6])
def test_plans_are_feasible(planner, protocol, count, seed, tiny_calibration):
    config = _config(protocol, count, seed)
    options = PlanOptions(max_subchannel_power_w=0.05)
    plan = make_plan(config, MODEL, planner, options, tiny_calibration)
    problem = Problem(config, MODEL)
    for u in range(count):  # memory
        assert plan.device_memory_bytes[u] <= problem.budget[u], f"device {u} over its memory"
        assert 1 <= plan.cuts[u] < problem.total_layers
    for row in plan.subchannel_owner:  # a subchannel serves one device; every device gets one
        assert len(row) == plan.subchannels and all(-1 <= o < count for o in row)
        assert set(range(count)) <= set(row)
    for row_owners, row_power in zip(plan.subchannel_owner, plan.power_w):  # power limits
        owners, power = np.array(row_owners), np.array(row_power)
        assert np.all(power >= 0) and np.all(power <= 0.05 + 1e-12)
        for u, device in enumerate(problem.devices):
            assert power[owners == u].sum() <= device.max_power_w * (1 + 1e-9)
    if protocol == "sfl" and plan.protocol == "sfl":
        assert len(set(plan.cuts)) == 1
    assert plan.sim_s > 0 and len(plan.round_s) == config.train.rounds


@pytest.mark.parametrize("protocol, count, seed", INSTANCES)
def test_optimisers_never_predict_slower_than_equal(protocol, count, seed, tiny_calibration):
    config = _config(protocol, count, seed)
    equal = make_plan(config, MODEL, "equal")
    assert make_plan(config, MODEL, "sft", calibration=tiny_calibration).sim_s <= equal.sim_s * (1 + 1e-9)
    assert make_plan(config, MODEL, "bandwidth_only").sim_s <= equal.sim_s * (1 + 1e-9)
    assert make_plan(config, MODEL, "cut_only").sim_s <= equal.sim_s * (1 + 1e-9)
    assert make_plan(config, MODEL, "fedsllm").total_delay_s <= equal.total_delay_s * (1 + 1e-9)


@pytest.mark.parametrize("protocol", ["sfl", "memsfl"])
@pytest.mark.parametrize("planner, tolerance",
                         [("equal", 1e-3), ("fedsllm", 1e-3), ("bandwidth_only", 1e-3), ("sft", 0.1)])
def test_search_objective_agrees_with_the_clock_replay(protocol, planner, tolerance, tiny_calibration):
    """The planners' fast round delay is the clock's number; with codecs the search prices them with
    bytes_per_element and the replay encodes them (header estimates differ most on tiny tensors)."""
    config = _config(protocol, 4, 0)
    problem = Problem(config, MODEL, tiny_calibration)
    decision = PLANNERS[planner](problem, PlanOptions())
    plan = make_plan(config, MODEL, planner, calibration=tiny_calibration)
    assert problem.mean_delay(decision) == pytest.approx(plan.mean_round_s, rel=tolerance)


def test_fedsllm_trades_rank_for_rounds():
    """rounds(2) is about twice rounds(16) in the fitted model while a round costs nearly the same:
    fedsllm takes rank 16, and its objective is rounds(rank) x round delay."""
    config = _config("sfl", 3, 0)
    plan = make_plan(config, MODEL, "fedsllm", PlanOptions(ranks=(2, 16)))
    assert plan.ranks == [16, 16, 16]
    problem = Problem(config, MODEL)
    decision = PLANNERS["fedsllm"](problem, PlanOptions(ranks=(2, 16)))
    assert total_delay(problem, decision) == pytest.approx(
        FITTED.rounds(16, config.train.local_steps) * problem.mean_delay(decision))


def test_plan_json_round_trips(tmp_path):
    plan = make_plan(_config("memsfl", 3, 2), MODEL, "fedsllm")
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    assert again.total_delay_s == plan.total_delay_s
    applied = again.apply(_config("memsfl", 3, 2))
    assert applied.devices.cuts == plan.cuts and applied.system.subchannel_owner == plan.subchannel_owner


def test_a_device_that_cannot_hold_one_layer_is_named():
    config = _config("sfl", 3, 0)
    config = parse_config({**config.to_tree(), "devices": {"count": 3, "memory_mb": [100.0, 0.001, 100.0]}})
    with pytest.raises(PlanError, match=r"device 1 \(laptop1\) has 0 MB, which cannot hold one layer"):
        make_plan(config, MODEL, "sft")


def test_a_device_without_power_is_named(monkeypatch):
    silent = profiles.DeviceClass(1e12, 16 * profiles.GB, 0.0, (20.0, 300.0))
    monkeypatch.setitem(profiles.DEVICE_CLASSES, "laptop", silent)
    with pytest.raises(PlanError, match=r"device 1 \(laptop1\) has maximum transmit power 0.0 W: no rate"):
        make_plan(_config("sfl", 3, 0), MODEL, "fedsllm")


def test_unknown_planner_and_protocol_are_clear():
    with pytest.raises(ValueError, match="unknown planner 'magic'; allowed: sft, fedsllm, equal"):
        make_plan(_config("sfl", 2, 0), MODEL, "magic")
    config = parse_config({"protocol": "fedlora", "devices": {"count": 2}})
    with pytest.raises(PlanError, match="protocol 'fedlora': planners choose cuts for split protocols"):
        make_plan(config, MODEL, "sft")


def test_a_planner_plugs_in():
    @register("deepest")
    def deepest(problem, options):
        decision = PLANNERS["equal"](problem, options)
        decision.cuts = np.minimum(problem.max_cut(4), problem.total_layers - 1)
        decision.protocol = "memsfl"
        return decision

    try:
        plan = make_plan(_config("sfl", 3, 0), MODEL, "deepest")
        assert plan.planner == "deepest" and plan.protocol == "memsfl"
    finally:
        del PLANNERS["deepest"]

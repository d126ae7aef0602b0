"""Codec calibration: measured errors agree with a real split run's, gradients are measured on their
own, the sft planner keeps within both accuracy limits, and bad inputs are named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitfed.planning.calibrate import CodecCalibration, CodecError, calibrate_codecs, calibration_cuts
from splitfed.planning.problem import MB, PlanOptions
from splitfed.planning.registry import make_plan
from splitfed.run import run
from splitfed.system.costs import device_memory_bytes, layer_costs
from splitfed.wire.codecs import SpecError
from tests.conftest import TINY_CONFIGS, tiny_run_config

MODEL = TINY_CONFIGS["llama"]()
AGREEMENT = 0.05
"""Relative tolerance between the calibration and a run's own measurement: their batches differ (the
calibration draws its own from the corpus) and the run's codecs draw other random numbers."""


# --- Must show: the calibrated error on real activations matches a direct measurement -----------------------
# (stream, pipeline, cut). The run compresses only this stream: the server computes its gradients at the
# decoded activations, so lossy activations would change the gradients the other row measures.
DIRECT = [
    ("activations", "quant:4 > zstd", 2),
    ("activations", "topk:0.1 > quant:4 > zstd", 2),
    ("activations", "topk:0.3 > quant:6 > zstd", 4),
    ("gradients", "quant:6 > zstd", 3),
    ("gradients", "topk:0.3 > quant:6 > zstd", 1),
]
SPECS = sorted({spec for _, spec, _ in DIRECT})


@pytest.mark.parametrize("stream, spec, cut", DIRECT)
def test_calibrated_error_matches_a_real_split_run(stream, spec, cut, tiny_calibration, tiny_llama_dir, corpus_dir,
                                                   tmp_path):
    """One device, sfl, the pipeline on one stream: the run's sender measures ||decoded - sent|| / ||sent||
    of every message it sends (``*_rel_error``, mean over the messages); the calibration predicts it. A tiny
    learning rate keeps the model where the calibration measures it, at its start (at 1e-2 one step moves
    the tiny model enough to change the gradients' top-k error by 2-3%)."""
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", devices={"count": 1, "cuts": [cut]},
                             compression={stream: spec}, train={"rounds": 1, "local_steps": 4, "lr": 1e-5})
    measured = run(config, tmp_path / "run", progress=False)[f"{stream}_rel_error"]
    calibrated = tiny_calibration.at(stream, spec, cut).tensor
    assert calibrated == pytest.approx(measured, rel=AGREEMENT)
    for other in SPECS:  # the test can tell the pipelines apart: any other one's number would fail it
        if other != spec:
            assert tiny_calibration.at(stream, other, cut).tensor != pytest.approx(measured, rel=AGREEMENT), other


@pytest.mark.parametrize("spec, cut", [("topk:0.5 > quant:8 > zstd", 1), ("topk:0.5 > quant:8 > zstd", 3),
                                       ("topk:0.3 > quant:6 > zstd", 1)])
def test_gradients_are_measured_on_their_own(spec, cut, tiny_calibration):
    """Top-k over the whole tensor errs differently on gradients than on activations: the gradient's token
    norms vary about twice as much (coefficient of variation 0.30 vs 0.16 at cut 1 of the tiny Llama), and
    top-k favours the large tokens. Here the two streams differ by more
    than the agreement the run test demands, so with that test's gradient row (topk:0.3, cut 1) the
    activations' number would fail where the gradients' passes."""
    activations = tiny_calibration.at("activations", spec, cut)
    gradients = tiny_calibration.at("gradients", spec, cut)
    assert gradients.tensor != pytest.approx(activations.tensor, rel=AGREEMENT)
    assert {(e.stream, e.cut) for e in tiny_calibration.errors if e.spec == spec} == {
        (stream, cut) for stream in ("activations", "gradients") for cut in range(1, 6)}


def test_calibration_is_deterministic_for_a_seed(tiny_llama_dir, corpus_dir):
    def measure(seed: int) -> CodecCalibration:
        config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", seed=seed)
        return calibrate_codecs(config, ["quant:4 > zstd"], cuts=[2], batches=1)

    first = measure(0)
    assert measure(0) == first
    assert measure(1).errors != first.errors  # other batches and other codec draws


@pytest.mark.parametrize("total_layers, configured, expected", [
    (6, (), [1, 2, 3, 4, 5]),
    (30, (4,), [1, 4, 8, 15, 22, 29]),
    (30, (0, 30, 12), [1, 8, 12, 15, 22, 29]),  # cuts outside 1..L-1 are not cuts
    (2, (), [1]),
    (1, (), []),
])
def test_calibration_cuts_spread_over_the_layers(total_layers, configured, expected):
    assert calibration_cuts(total_layers, configured) == expected


MEASURED = CodecCalibration("model", 1, 4, 32, 0, (
    CodecError("activations", "quant:4", 2, 0.2, 0.1),
    CodecError("activations", "quant:4", 6, 0.4, 0.3),
))


@pytest.mark.parametrize("cut, tensor, token_median", [
    (2, 0.2, 0.1), (4, 0.3, 0.2), (5, 0.35, 0.25), (1, 0.2, 0.1), (9, 0.4, 0.3),  # linear inside, nearest outside
])
def test_errors_between_measured_cuts_are_interpolated(cut, tensor, token_median):
    error = MEASURED.at("activations", "quant:4", cut)
    assert (error.tensor, error.token_median) == (pytest.approx(tensor), pytest.approx(token_median))
    assert error.worst == pytest.approx(max(tensor, token_median))


def test_an_uncalibrated_pipeline_is_named():
    with pytest.raises(KeyError, match=r"'quant:6' was not calibrated on gradients; calibrated: \['quant:4'\]"):
        MEASURED.at("gradients", "quant:6", 2)


# --- the sft planner under both limits -----------------------------------------------------------------------
def _instance(model_dir, corpus, count: int = 4, seed: int = 1):
    """Heterogeneous memory budgets (1..5 layers of the tiny model) on the tiny model and corpus."""
    rng = np.random.default_rng(seed)
    costs = layer_costs(MODEL, ["q_proj", "v_proj"])
    budgets = [device_memory_bytes(costs, int(k), 4, 4, 32) / MB * 1.01 for k in rng.integers(1, 6, count)]
    return tiny_run_config(model_dir, corpus, "sfl", seed=seed, devices={"count": count, "memory_mb": budgets},
                           train={"rounds": 2, "local_steps": 2, "batch_size": 4, "seq_len": 32},
                           system={"subchannels": 2 * count})


def _mean_worst(errors: list[dict[str, float]]) -> float:
    return float(np.mean([max(e["tensor"], e["token_median"]) for e in errors]))


@pytest.mark.parametrize("max_error, max_grad_error", [(0.0, 0.0), (0.05, 0.3), (0.3, 0.05), (0.3, 0.2), (1.0, 1.0)])
def test_sft_keeps_within_both_limits(max_error, max_grad_error, tiny_calibration, tiny_llama_dir, corpus_dir):
    config = _instance(tiny_llama_dir, corpus_dir)
    options = PlanOptions(max_error=max_error, max_grad_error=max_grad_error)
    plan = make_plan(config, MODEL, "sft", options, tiny_calibration)
    assert _mean_worst(plan.activation_errors) <= max_error + 1e-12
    assert _mean_worst(plan.gradient_errors) <= max_grad_error + 1e-12
    if max_error == 0.0:
        assert set(plan.activations) == {"none"}
    if max_grad_error == 0.0:
        assert set(plan.gradients) == {"none"}
    if max_error == max_grad_error == 1.0:  # the tiny model's round is all radio: loose limits buy compression
        assert set(plan.activations) != {"none"} and set(plan.gradients) != {"none"}
    applied = plan.apply(config)
    assert applied.compression.activations_per_device == plan.activations
    assert applied.compression.gradients_per_device == plan.gradients


def test_sft_measures_the_configured_model_when_given_no_calibration(tiny_calibration, tiny_llama_dir, corpus_dir):
    """Without a calibration, sft measures the configured model and data itself (reporting progress): with
    the fixture's model, data, seed and batch, the numbers are the fixture's."""
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl", system={"subchannels": 8})
    lines: list[str] = []
    plan = make_plan(config, MODEL, "sft", progress=lines.append)
    assert lines and "calibrating" in lines[0]
    for errors, stream, specs in ((plan.activation_errors, "activations", plan.activations),
                                  (plan.gradient_errors, "gradients", plan.gradients)):
        for measured, spec, cut in zip(errors, specs, plan.cuts):
            expected = CodecError(stream, spec, cut, 0.0, 0.0) if spec == "none" else tiny_calibration.at(stream, spec, cut)
            assert measured == {"tensor": expected.tensor, "token_median": expected.token_median}


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, named", [
    ({"max_error": -0.1}, "max_error"),
    ({"max_grad_error": math.nan}, "max_grad_error"),
    ({"max_grad_error": "0.2"}, "max_grad_error"),
    ({"ranks": ()}, "ranks"),
    ({"max_subchannel_power_w": 0.0}, "max_subchannel_power_w"),
])
def test_bad_plan_options_are_named(options, named):
    with pytest.raises(ValueError, match=f"plan option {named} must be"):
        PlanOptions(**options)


@pytest.mark.parametrize("arguments, error, message", [
    ({"specs": ["quant:4"], "batches": 0}, ValueError, "batches must be at least 1, got 0"),
    ({"specs": []}, ValueError, "no pipeline specs"),
    ({"specs": ["quant:4"], "cuts": [0, 6]}, ValueError, r"cuts \[0, 6\] are not cuts of this 6-layer model; allowed: 1..5"),
    ({"specs": ["topk:2"]}, SpecError, "RATIO 2.0 is outside"),
])
def test_bad_calibration_input_is_named(arguments, error, message, tiny_llama_dir, corpus_dir):
    config = tiny_run_config(tiny_llama_dir, corpus_dir, "sfl")
    with pytest.raises(error, match=message):
        calibrate_codecs(config, **arguments)


def test_a_missing_model_is_named_before_measuring(corpus_dir):
    config = tiny_run_config(corpus_dir / "no-model", corpus_dir, "sfl")
    with pytest.raises(ValueError, match="no-model"):
        calibrate_codecs(config, ["quant:4"])

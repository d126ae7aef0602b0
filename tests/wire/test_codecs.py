"""Codec pipelines: exact lossless round trips, unbiased quantization, exact top-k, error feedback,
clear errors on corrupt payloads and bad specs, and size estimates that match real encodings."""

from __future__ import annotations

import json

import pytest
import torch

from splitfed.config import ConfigError, parse_config
from splitfed.wire.codecs import (
    PAYLOAD,
    CodecError,
    Encoded,
    ErrorFeedback,
    SpecError,
    bytes_per_element,
    parse_pipeline,
)
from splitfed.wire.messages import Message, MessageError, encode


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(seed: int = 0, shape: tuple[int, ...] = (4, 16, 64)) -> torch.Tensor:
    return torch.randn(shape, generator=_rng(seed))


# Quarter-integers with a per-channel offset: every step of ``center`` is exact on them.
_DYADIC = torch.randint(-40, 40, (3, 10, 24), generator=_rng(3)).float() / 4 + torch.arange(24.0)


def _round_trip(spec: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    pipeline = parse_pipeline(spec)
    return pipeline.decode(pipeline.encode(x, _rng(seed)))


@pytest.mark.parametrize(
    ("spec", "x"),
    [
        ("none", _activations()),
        ("zstd", _activations()),
        ("zstd:19", torch.zeros(3, 7)),
        ("fp16", _activations().half().float()),  # fp16-representable input
        ("bf16 > zstd", _activations().bfloat16().float()),
        ("topk:1.0 > zstd", _activations()),  # keeps everything: lossless
        ("fp16", torch.tensor(1.5)),  # 0-d tensor
        ("center", _DYADIC),  # exact when x - center is (dyadic values)
        ("center > zstd", _DYADIC),
        ("center > topk:1.0 > zstd", _DYADIC[0]),
        ("center", torch.zeros(0, 5)),  # no tokens
    ],
)
def test_lossless_pipelines_round_trip_exactly(spec, x):
    decoded = _round_trip(spec, x)
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    assert torch.equal(decoded, x)


@pytest.mark.parametrize("spec", ["quant:4", "quant:2:16", "quant:1", "topk:0.3 > quant:3 > zstd", "quant:8:7"])
def test_stochastic_quantization_is_unbiased(spec):
    x = _activations(shape=(2, 40))
    draws = torch.stack([_round_trip(spec, x, seed) for seed in range(2000)])
    target = _round_trip(spec.split(" > quant")[0], x) if spec.startswith("topk") else x  # top-k part is deterministic
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - target).abs() <= 5 * standard_error + 1e-6).all()
    assert not torch.equal(_round_trip(spec, x, 0), _round_trip(spec, x, 1))  # it is stochastic
    assert torch.equal(_round_trip(spec, x, 7), _round_trip(spec, x, 7))  # and seeded


@pytest.mark.parametrize(
    ("spec", "shape", "kept_per_row"),
    [("topk:0.1", (4, 16, 50), None), ("topk:0.25", (1000,), None), ("topk_token:0.1", (4, 16, 50), 5)],
)
def test_topk_keeps_exactly_the_k_largest_magnitudes(spec, shape, kept_per_row):
    x = _activations(shape=shape)
    decoded = _round_trip(spec, x)
    kept = decoded != 0
    assert torch.equal(decoded[kept], x[kept])  # survivors are exact
    if kept_per_row is None:
        k = round(float(spec.split(":")[1]) * x.numel())
        assert int(kept.sum()) == k
        assert x.abs()[kept].min() >= x.abs()[~kept].max()
    else:
        rows, kept_rows = x.reshape(-1, shape[-1]).abs(), kept.reshape(-1, shape[-1])
        assert (kept_rows.sum(1) == kept_per_row).all()
        for row, mask in zip(rows, kept_rows):
            assert row[mask].min() >= row[~mask].max()


def _hidden_states(seed: int = 0) -> torch.Tensor:
    """Like an LLM's hidden states: a per-channel offset, one "attention sink" token per
    sequence with a huge channel, and a row of zeros. (4, 16, 64)."""
    x = _activations(seed) + 3 * torch.randn(64, generator=_rng(seed + 1))
    x[:, 0, 7] = 900.0
    x[1, 5] = 0.0
    return x


@pytest.mark.parametrize("spec", ["ecq:2", "ecq:0.5", "ecq:3:row", "center > ecq:1.5", "center > ecq:2:row"])
def test_ecq_rounds_to_nearest_and_sends_outliers_and_zeros_exactly(spec):
    x = _hidden_states()
    pipeline = parse_pipeline(spec)
    encoded = pipeline.encode(x, _rng())
    decoded = pipeline.decode(encoded)
    assert torch.equal(decoded, _round_trip(f"{spec} > zstd", x, seed=1))  # deterministic; zstd changes nothing
    assert torch.equal(decoded[:, 0, 7], x[:, 0, 7])  # the sink's huge channel is an exact escape
    steps = encoded.parts["scales"].float()
    step = steps.repeat_interleave(x.numel() // steps.numel()).view_as(x)
    assert ((decoded - x).abs() <= step * 1.01 + 1e-4).all()  # inside its rounding bin: within a step
    if not spec.startswith("center"):
        assert torch.equal(decoded[1, 5], torch.zeros(64))  # zeros stay zero
    assert float((decoded - x).norm() / x.norm()) < 0.1


def test_center_removes_the_per_channel_offset_before_quantizing():
    x = _hidden_states()
    plain, centered = _round_trip("ecq:2", x), _round_trip("center > ecq:2", x)
    not_sink = torch.ones_like(x, dtype=torch.bool)
    not_sink[:, 0] = False
    assert (centered - x)[not_sink].norm() < 0.6 * (plain - x)[not_sink].norm()


def test_codecs_run_on_one_torch_thread_and_restore_the_count():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipeline = parse_pipeline("center > ecq:2 > zstd")
        pipeline.decode(pipeline.encode(_activations(), _rng()))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("spec", ["topk:0.05", "topk_token:0.1 > quant:2", "topk:0.2 > quant:4 > zstd", "quant:3"])
def test_error_feedback_makes_the_decoded_sum_track_the_input_sum(spec):
    pipeline = parse_pipeline(spec)
    feedback = ErrorFeedback(pipeline)
    sent_sum = torch.zeros(4, 32)
    decoded_sum = torch.zeros(4, 32)
    plain_sum = torch.zeros(4, 32)
    for step in range(200):
        x = _activations(step, (4, 32)) + 0.3  # a mean the compression would lose without feedback
        sent_sum += x
        decoded_sum += pipeline.decode(feedback.encode(("up", 0), x, _rng(step)))
        plain_sum += pipeline.decode(pipeline.encode(x, _rng(step)))
    residual = (sent_sum - decoded_sum).abs().max()
    assert torch.allclose(sent_sum - decoded_sum, feedback.residuals[("up", 0)], atol=1e-3)
    assert residual < 0.1 * (sent_sum - plain_sum).abs().max()  # bounded residual, not a growing error
    assert residual < 20  # one tensor's worth, not 200 steps' worth


def _corrupt(encoded: Encoded, part: str, tensor: torch.Tensor | None = None, **meta) -> Encoded:
    parts = dict(encoded.parts)
    if tensor is None:
        del parts[part]
    else:
        parts[part] = tensor
    return Encoded(parts, {**encoded.meta, **meta})


_X = _activations()


@pytest.mark.parametrize(
    ("spec", "mutate", "expected"),
    [
        ("topk:0.1", lambda e: _corrupt(e, "mask", e.parts["mask"][:-3]), "part 'mask' has shape"),
        ("topk:0.1", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD][:-1]), "values for a mask with"),
        ("topk:0.1", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD].double()), "dtype torch.float64"),
        ("topk:0.1", lambda e: _corrupt(e, "mask"), r"parts \['values'\] do not match"),
        ("quant:4", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD][:10]), "part 'values' has shape"),
        ("quant:4", lambda e: _corrupt(e, "scales", e.parts["scales"].float()), "part 'scales' has dtype"),
        ("quant:4", lambda e: _corrupt(e, "scales", torch.full_like(e.parts["scales"], float("nan"))), "finite"),
        ("quant:4", lambda e: Encoded(e.parts, {**e.meta, "stages": [{"numel": -1}]}), "non-negative integer"),
        ("fp16", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD].float()), "expected torch.float16"),
        ("fp16", lambda e: Encoded(e.parts, {**e.meta, "shape": [3, 3]}), "for shape"),
        ("fp16", lambda e: Encoded(e.parts, {**e.meta, "spec": "bf16"}), "encoded with 'bf16'"),
        ("zstd", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD][:-5]), "zstd"),
        ("zstd", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD][:4]), "zstd"),
        ("zstd", lambda e: _corrupt(e, PAYLOAD, torch.zeros(50, dtype=torch.uint8)), "not a zstd frame"),
        ("ecq:2", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD][:-1]), "part 'values' has shape"),
        ("ecq:2", lambda e: _corrupt(e, "outliers", torch.zeros(3)), "part 'outliers' has shape"),
        ("ecq:2", lambda e: _corrupt(e, "levels", e.parts["levels"] + 0.75), "within half a step"),
        ("ecq:2", lambda e: _corrupt(e, "levels", e.parts["levels"][:-1]), "part 'levels' has shape"),
        ("ecq:2", lambda e: _corrupt(e, "scales", torch.zeros_like(e.parts["scales"])), "finite and positive"),
        ("ecq:2", lambda e: _corrupt(e, "scales"), r"do not match the expected"),
        ("ecq:2:row", lambda e: Encoded(e.parts, {**e.meta, "stages": [{"numel": 4096, "rows": 3}]}), "rows cannot hold"),
        ("ecq:2:row", lambda e: _corrupt(e, "scales", e.parts["scales"][:-1]), "part 'scales' has shape"),
        ("center > ecq:2", lambda e: _corrupt(e, "center", e.parts["center"][:-1]), "part 'center' has shape"),
        ("center > ecq:2", lambda e: _corrupt(e, "center", torch.full_like(e.parts["center"], float("inf"))), "finite"),
        ("center > ecq:2 > zstd", lambda e: _corrupt(e, PAYLOAD, e.parts[PAYLOAD][:-2]), "zstd"),
        ("quant:4 > zstd", lambda e: Encoded(e.parts, {**e.meta, "zstd": {}}), "zstd metadata"),
        ("quant:4 > zstd", lambda e: Encoded(e.parts, {**e.meta, "zstd": {k: {**v, "dtype": ["x"]} for k, v in e.meta["zstd"].items()}}),
         "metadata dtype"),
    ],
)
def test_corrupt_or_truncated_encodings_raise_clear_errors(spec, mutate, expected):
    pipeline = parse_pipeline(spec)
    with pytest.raises(CodecError, match=expected) as error:
        pipeline.decode(mutate(pipeline.encode(_X, _rng())))
    assert isinstance(error.value, MessageError)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("topk", r"'topk': topk takes 1..1 arguments, got 0"),
        ("topk:1.5", r"RATIO 1.5 is outside \(0, 1\]"),
        ("topk:0", r"RATIO 0.0 is outside"),
        ("topk:abc", r"RATIO 'abc' is not a number"),
        ("quant:9", r"BITS 9 is outside 1..8"),
        ("quant:4:0", r"BLOCK 0 is outside 1..65536"),
        ("quant:2.5", r"BITS '2.5' is not an integer"),
        ("zstd:99", r"LEVEL 99 is outside 1..22"),
        ("gzip", r"unknown codec 'gzip'"),
        ("zstd > topk:0.1", r"'topk:0.1' cannot follow 'zstd'"),
        ("quant:4 > fp16", r"'fp16' cannot follow 'quant:4'"),
        ("topk:0.1 > topk_token:0.1", r"cannot follow"),
        ("topk:0.1 >", r"unknown codec ''"),
        ("ecq:0", r"STEP 0.0 is outside \(0, 64\]"),
        ("ecq:2:col", r"the second argument of ecq can only be 'row'"),
        ("ecq:2 > quant:4", r"'quant:4' cannot follow 'ecq:2'"),
        ("topk:0.1 > center", r"'center' cannot follow 'topk:0.1'"),
        ("center:1", r"center takes 0..0 arguments"),
    ],
)
def test_bad_specs_name_the_problem_and_list_what_is_allowed(spec, expected):
    with pytest.raises(SpecError, match=expected) as error:
        parse_pipeline(spec)
    assert "quant:BITS[:BLOCK]" in str(error.value)


def test_bad_spec_in_config_names_the_field():
    with pytest.raises(ConfigError, match=r"compression.gradients: 'quant:12': BITS 12 is outside 1..8.*allowed: none"):
        parse_config({"devices": {"cuts": [1]}, "compression": {"gradients": "quant:12"}})
    assert parse_config({"devices": {"cuts": [1]}}).compression.activations == "none"


def _measured_bytes(spec: str, x: torch.Tensor) -> int:
    """Bytes the encoded tensor adds to a real message (header and index entries included)."""
    empty = len(encode(Message("adapter_download", "a", 0, 0)))
    if spec == "none":
        return len(encode(Message("adapter_download", "a", 0, 0, {"t": x}))) - empty
    encoded = parse_pipeline(spec).encode(x, _rng())
    tensors = {"t" if p == PAYLOAD else f"t#{p}": v for p, v in encoded.parts.items()}
    values = {"t#codec": json.dumps(encoded.meta)}
    return len(encode(Message("adapter_download", "a", 0, 0, tensors, values))) - empty


@pytest.mark.parametrize(
    ("spec", "tolerance"),
    [
        # exact part sizes: only the header is estimated
        ("none", 0.01), ("fp16", 0.01), ("topk:0.1", 0.01), ("topk_token:0.05", 0.01), ("quant:4", 0.01),
        ("topk:0.1 > quant:8", 0.01), ("quant:3:32", 0.01), ("ecq:2", 0.01), ("ecq:0.25:row", 0.01),
        ("center > ecq:2", 0.01), ("center", 0.01),
        # zstd: estimated (an upper bound on the payload, a measured factor on the mask)
        ("topk:0.05 > quant:4 > zstd", 0.15), ("topk_token:0.02 > quant:2 > zstd", 0.15), ("zstd", 0.15),
        ("quant:8 > zstd", 0.15), ("topk:0.01 > zstd", 0.15),
        # ecq under zstd: measured bits per element of Gaussian symbols by step
        ("ecq:2 > zstd", 0.15), ("ecq:1:row > zstd", 0.15), ("center > ecq:3 > zstd", 0.15), ("ecq:6 > zstd", 0.15),
        ("topk:0.1 > ecq:1 > zstd", 0.15),
    ],
)
def test_bytes_per_element_matches_measured_size(spec, tolerance):
    x = _activations(shape=(4, 64, 576))
    measured = _measured_bytes(spec, x) / x.numel()
    estimated = bytes_per_element(spec, x.numel(), row_size=576)
    assert estimated == pytest.approx(measured, rel=tolerance)

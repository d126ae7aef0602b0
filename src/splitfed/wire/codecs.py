"""Composable tensor codecs for the wire: centering, float cast, top-k, quantization, zstd.

A pipeline is written as a spec string read left to right, e.g. ``"topk:0.1 > quant:4 > zstd"``:
keep the 10% largest magnitudes, quantize the survivors to 4 bits, then code every part
losslessly with zstandard. Stages must come in this order, each at most once::

    [center]  >  [topk:R | topk_token:R]  >  [fp16 | bf16 | quant:B[:BLOCK] | ecq:STEP[:row]]  >  [zstd[:LEVEL]]

``"none"`` (or an empty string) sends the tensor as it is.

- ``center`` subtracts each channel's median over the tokens (LLM hidden states share a large
  per-channel offset); ``topk`` / ``topk_token`` keep the largest magnitudes of the tensor / of
  each token; ``quant`` is unbiased stochastic quantization with per-block max scales;
  ``ecq`` is deterministic uniform quantization with a step relative to the data's robust spread,
  4-bit symbols, exact outliers and bin-mean reconstruction, made for ``zstd`` to entropy-code
  (on SmolLM2's activations ``center > ecq:2 > zstd`` takes ~1.9 bits per value).

Every codec implements one protocol: ``encode(x, rng) -> (parts, meta)`` and
``decode(parts, meta) -> tensor``. ``parts`` are named tensors; the part ``"values"``
(``PAYLOAD``) is what the next stage encodes further, the others (``"mask"``,
``"scales"``, ...) are side parts carried as they are. ``meta`` is a small JSON-able dict.
``zstd`` is lossless and codes every part the earlier stages produced. Pipelines run their
torch operations on one thread (``ONE_THREAD``).

Decoding trusts nothing: every dtype, shape and length is checked against the metadata
and a corrupt or truncated encoding raises ``CodecError`` (a ``MessageError``).

For the planner, ``bytes_per_element`` predicts a pipeline's size from the spec alone, without
running a model (its error is measured on real tensors: ``splitfed.planning.calibrate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import zstandard

from splitfed.wire.messages import MessageError

PAYLOAD = "values"
Parts = dict[str, torch.Tensor]
Meta = dict[str, Any]

# Estimated bytes of metadata an encoded tensor adds to a message: the codec header (JSON)
# plus one safetensors index entry per part. Measured on this code; see ``bytes_per_element``.
HEADER_BYTES = 40
HEADER_BYTES_PER_STAGE = 24
HEADER_BYTES_PER_PART = 80
# Size of a zstd-coded random bitmask with keep ratio p, as a multiple of its binary entropy
# n H(p) / 8 bytes: measured with zstd level 3 on 147k- and 590k-element masks (Huffman on
# bytes cannot go below one bit per byte, so sparse masks sit further from the entropy).
ZSTD_MASK_FACTORS = ((0.005, 1.85), (0.01, 1.74), (0.02, 1.6), (0.05, 1.31), (0.1, 1.14), (0.2, 1.02), (0.5, 1.0))
ZSTD_FRAME_BYTES = 12
MAX_DECODED_BYTES = 2**31
ONE_THREAD = True
"""Run the codecs' torch operations on one thread (see ``_one_torch_thread``); benchmarks turn it off to compare."""


class CodecError(MessageError):
    """An encoded tensor that is corrupt, truncated or does not match the expected pipeline."""


class SpecError(ValueError):
    """A pipeline spec that cannot be parsed; the text says what is allowed."""


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------
def _meta_int(meta: Meta, key: str, where: str) -> int:
    value = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CodecError(f"{where}: metadata field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _meta_shape(meta: Meta, where: str) -> list[int]:
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CodecError(f"{where}: metadata field 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _check_part(parts: Parts, name: str, dtype: torch.dtype, numel: int, where: str) -> torch.Tensor:
    """The 1-D part ``name`` of ``dtype`` with exactly ``numel`` elements, or a CodecError."""
    part = parts.get(name)
    if part is None:
        raise CodecError(f"{where}: part {name!r} is missing")
    if part.dtype != dtype:
        raise CodecError(f"{where}: part {name!r} has dtype {part.dtype}, expected {dtype}")
    if part.dim() != 1 or part.numel() != numel:
        raise CodecError(f"{where}: part {name!r} has shape {list(part.shape)}, expected [{numel}]")
    return part


def _bytes_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A writable 1-D uint8 tensor holding ``data``."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside, then restore the thread count.

    The tensors of one message are small (~0.5 MB): spreading each operation over threads
    costs more synchronisation than it saves, and when other processes load the cores every
    operation waits for its slowest thread (measured: 5-80 MB/s with 2 threads under load
    against 240-380 MB/s with one).
    """
    threads = torch.get_num_threads()
    if not ONE_THREAD or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.uint8)}


# ---------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------
class Codec(Protocol):
    """One stage of a pipeline."""

    order: ClassVar[int]
    """Stages of a pipeline must have strictly increasing ``order``."""
    side_parts: ClassVar[tuple[str, ...]]
    """Names of the parts besides ``PAYLOAD`` that ``encode`` returns."""
    spec: str

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]: ...

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor: ...


class Transform(Codec, Protocol):
    """A lossy (or casting) stage, with the size model the planner uses."""

    def estimate(self, numel: int, row_size: int) -> tuple[int, dict[str, tuple[float, float]]]:
        """For ``numel`` input values: (payload elements, {part: (bytes, bytes after zstd)}), PAYLOAD included."""
        ...


def _packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _zstd_mask_bytes(numel: int, kept: int) -> float:
    """Estimated zstd size of a bitmask of ``numel`` positions with ``kept`` set (see ZSTD_MASK_FACTORS)."""
    p = min(kept, numel - kept) / max(numel, 1)
    if p <= 0:
        return 0.0
    entropy = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    points = [(math.log(q), f) for q, f in ZSTD_MASK_FACTORS]
    x = min(max(math.log(p), points[0][0]), points[-1][0])
    factor = next(f0 + (f1 - f0) * (x - x0) / (x1 - x0) for (x0, f0), (x1, f1) in zip(points, points[1:]) if x <= x1)
    return numel * entropy / 8 * factor


@dataclass
class FloatCast:
    """Cast to fp16 or bf16; decodes to fp32. fp16 saturates at +-65504 instead of overflowing to inf."""

    spec: str
    dtype: torch.dtype
    order: ClassVar[int] = 2
    side_parts: ClassVar[tuple[str, ...]] = ()

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]:
        if self.dtype == torch.float16:
            limit = torch.finfo(torch.float16).max
            x = x.clamp(-limit, limit)
        return {PAYLOAD: x.to(self.dtype)}, {}

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor:
        values = parts[PAYLOAD]
        if values.dtype != self.dtype:
            raise CodecError(f"{self.spec}: payload has dtype {values.dtype}, expected {self.dtype}")
        return values.float()

    def estimate(self, numel: int, row_size: int) -> tuple[int, dict[str, tuple[float, float]]]:
        return numel, {PAYLOAD: (2 * numel, 2 * numel)}


@dataclass
class TopK:
    """Keep the ``ratio`` largest magnitudes of the whole tensor, or of every row (``per_token``).

    Parts: ``values`` (k,) fp32 survivors in index order, ``mask`` (ceil(n / 8),) uint8 bitmask.
    """

    spec: str
    ratio: float
    per_token: bool
    order: ClassVar[int] = 1
    side_parts: ClassVar[tuple[str, ...]] = ("mask",)

    def keep(self, n: int) -> int:
        return min(n, max(1, round(self.ratio * n)))

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]:
        flat = x.reshape(-1)
        n = flat.numel()
        # numpy's introselect (argpartition) is several times faster than torch.topk here.
        magnitude = flat.abs().numpy()
        mask = np.zeros(n, dtype=np.bool_)
        if n and self.per_token and x.dim() > 0:
            rows = magnitude.reshape(-1, x.shape[-1])  # (tokens, hidden)
            cut = rows.shape[1] - self.keep(rows.shape[1])
            top = np.argpartition(rows, cut, axis=1)[:, cut:]
            np.put_along_axis(mask.reshape(rows.shape), top, True, axis=1)
        elif n:
            cut = n - self.keep(n)
            mask[np.argpartition(magnitude, cut)[cut:]] = True
        values = flat[torch.from_numpy(mask)]
        return {PAYLOAD: values, "mask": torch.from_numpy(np.packbits(mask))}, {"numel": n}

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor:
        numel = _meta_int(meta, "numel", self.spec)
        bits = _check_part(parts, "mask", torch.uint8, (numel + 7) // 8, self.spec)
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).view(np.bool_))
        values = parts[PAYLOAD]
        if values.dtype != torch.float32:
            raise CodecError(f"{self.spec}: values have dtype {values.dtype}, expected torch.float32")
        if values.dim() != 1 or values.numel() != int(mask.sum()):
            raise CodecError(f"{self.spec}: {values.numel()} values for a mask with {int(mask.sum())} positions")
        return torch.zeros(numel, dtype=torch.float32).masked_scatter_(mask, values)

    def estimate(self, numel: int, row_size: int) -> tuple[int, dict[str, tuple[float, float]]]:
        kept = numel // row_size * self.keep(row_size) if self.per_token else self.keep(numel)
        mask = math.ceil(numel / 8)
        return kept, {PAYLOAD: (4 * kept, 4 * kept), "mask": (mask, min(mask, _zstd_mask_bytes(numel, kept)))}


def _pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 levels < 2**bits, little-endian, into ceil(n * bits / 8) bytes."""
    if bits == 8:
        return q
    groups = np.zeros(((q.size + 7) // 8, 8), dtype="<u8")
    groups.reshape(-1)[: q.size] = q
    words = np.zeros(groups.shape[0], dtype="<u8")
    for j in range(8):
        words |= groups[:, j] << np.uint64(j * bits)
    return words.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)[: _packed_size(q.size, bits)]


def _unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return packed[:n]
    whole = np.zeros((n + 7) // 8 * bits, dtype=np.uint8)
    whole[: packed.size] = packed
    groups = np.zeros(((n + 7) // 8, 8), dtype=np.uint8)
    groups[:, :bits] = whole.reshape(-1, bits)
    words = groups.view("<u8").reshape(-1, 1)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    return ((words >> shifts) & np.uint64(2**bits - 1)).astype(np.uint8).reshape(-1)[:n]


@dataclass
class StochasticQuant:
    """Unbiased stochastic quantization to ``bits`` bits with one scale per block of ``block`` values.

    A block with scale s = max |x| (rounded up to bf16) maps x to the grid of 2**bits points
    on [-s, s] and rounds down or up at random with the probabilities that make E[decoded] = x.
    Parts: ``values`` (ceil(n * bits / 8),) uint8 packed levels, ``scales`` (ceil(n / block),) bf16.
    """

    spec: str
    bits: int
    block: int
    order: ClassVar[int] = 2
    side_parts: ClassVar[tuple[str, ...]] = ("scales",)

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]:
        flat = x.reshape(-1).float()
        n, levels = flat.numel(), 2**self.bits - 1
        blocks = torch.nn.functional.pad(flat, (0, -n % self.block)).view(-1, self.block)  # (blocks, block)
        # bf16 keeps fp32's range; the factor makes the rounded scale >= the block maximum.
        scales = (blocks.abs().amax(dim=1) * (1 + 2.0**-7)).to(torch.bfloat16)
        if not torch.isfinite(scales).all():
            raise ValueError(f"{self.spec}: cannot quantize a tensor with NaN or inf values")
        safe = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        position = (blocks / safe + 1) * (levels / 2)  # in [0, levels]
        noise = torch.rand(position.shape, generator=rng)
        q = (position + noise).floor_().clamp_(0, levels).to(torch.uint8).reshape(-1)[:n]
        return {PAYLOAD: torch.from_numpy(_pack_bits(q.numpy(), self.bits)), "scales": scales}, {"numel": n}

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor:
        n = _meta_int(meta, "numel", self.spec)
        num_blocks = -(-n // self.block)
        packed = _check_part(parts, PAYLOAD, torch.uint8, _packed_size(n, self.bits), self.spec)
        scales = _check_part(parts, "scales", torch.bfloat16, num_blocks, self.spec).float()
        if not (torch.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError(f"{self.spec}: block scales must be finite and non-negative")
        q = torch.from_numpy(_unpack_bits(packed.numpy(), self.bits, n).copy()).float()
        q = torch.nn.functional.pad(q, (0, -n % self.block)).view(num_blocks, self.block)
        return ((q * (2 / (2**self.bits - 1)) - 1) * scales[:, None]).reshape(-1)[:n]

    def estimate(self, numel: int, row_size: int) -> tuple[int, dict[str, tuple[float, float]]]:
        payload, scales = _packed_size(numel, self.bits), 2 * math.ceil(numel / self.block)
        return numel, {PAYLOAD: (payload, payload), "scales": (scales, scales)}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as (tokens, channels): the last dimension is the channel; a 0-d or 1-d tensor is one row."""
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)


CENTER_SAMPLE = 64
"""``center`` takes the channel medians over at most this many tokens (evenly strided)."""


@dataclass
class Center:
    """Subtract each channel's median over the tokens; the last dimension is the channel.

    The hidden states of an LLM carry a large offset per channel that all tokens share
    (about half the energy of SmolLM2's activations after block 4). Sent once per message,
    it leaves the quantizer a residual with half the energy, so the same step costs fewer
    bits. The median (not the mean) ignores the few "attention sink" tokens with huge values.
    Parts: ``values`` the input's shape fp32 (x - center), ``center`` (channels,) bf16.
    Lossless up to fp32 rounding.
    """

    spec: str
    order: ClassVar[int] = 0
    side_parts: ClassVar[tuple[str, ...]] = ("center",)

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]:
        rows = _rows(x.float()).numpy()
        if not np.isfinite(rows).all():
            raise ValueError(f"{self.spec}: cannot center a tensor with NaN or inf values")
        if rows.shape[0] == 0:
            center = torch.zeros(rows.shape[1], dtype=torch.bfloat16)
        else:  # lower median of an evenly strided sample of <= 64 tokens: any center is exact, a good one helps
            sample = rows[:: -(-rows.shape[0] // CENTER_SAMPLE)]
            middle = (sample.shape[0] - 1) // 2
            center = torch.from_numpy(np.partition(sample, middle, axis=0)[middle]).to(torch.bfloat16)
        values = torch.from_numpy(rows - center.float().numpy()).reshape(x.shape)
        return {PAYLOAD: values, "center": center}, {"shape": list(x.shape)}

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor:
        shape = _meta_shape(meta, self.spec)
        channels = shape[-1] if len(shape) >= 2 else math.prod(shape)
        center = _check_part(parts, "center", torch.bfloat16, channels, self.spec)
        if not torch.isfinite(center).all():
            raise CodecError(f"{self.spec}: channel centers must be finite")
        values = parts[PAYLOAD]
        if not values.is_floating_point() or values.numel() != math.prod(shape):
            raise CodecError(f"{self.spec}: payload holds {values.numel()} {values.dtype} values, expected {math.prod(shape)} floats")
        return (_rows(values.float().reshape(shape)) + center.float()).reshape(shape)

    def estimate(self, numel: int, row_size: int) -> tuple[int, dict[str, tuple[float, float]]]:
        return numel, {PAYLOAD: (4 * numel, 4 * numel), "center": (2 * row_size, 2 * row_size)}


ECQ_LIMIT = 7
"""Largest symbol magnitude of ``ecq``: symbols -7..7 and the escape fit in 4 bits."""
ROBUST_SIGMA = 1.0 / NormalDist().inv_cdf(0.75)
"""1.4826: the standard deviation of a Gaussian is this times the median of its magnitudes."""
# zstd (level 3) bits per element of ``ecq:STEP`` symbols of i.i.d. Gaussian data, by STEP:
# measured on 147k elements. zstd codes bytes, i.e. pairs of symbols, with Huffman codes, so it
# stays close to the pair entropy at 2 bits and above and ~0.3 bit above it below 1.5 bits.
ECQ_ZSTD_BITS = ((0.5, 3.11), (0.75, 2.52), (1.0, 2.18), (1.5, 1.84), (2.0, 1.57), (2.5, 1.30), (3.0, 1.05),
                 (4.0, 0.58), (5.0, 0.21), (6.0, 0.066), (8.0, 0.004))


def _robust_spread(magnitude: np.ndarray) -> np.ndarray:
    """Spread of each row of (rows, n) magnitudes |x|: 1.4826 x median |x| (the std of a Gaussian,
    blind to a few huge outliers); the RMS when more than half the row is zero; 1 for an all-zero
    row. A row of more than 65536 values takes the median of an evenly strided sample. Shape (rows,)."""
    sample = magnitude[:, :: -(-magnitude.shape[1] // 65536)]
    middle = (sample.shape[1] - 1) // 2
    spread = np.partition(sample, middle, axis=1)[:, middle] * np.float32(ROBUST_SIGMA)
    if (spread > 0).all():
        return spread
    rms = np.sqrt(np.square(magnitude, dtype=np.float64).mean(axis=1)).astype(np.float32)
    return np.where(spread > 0, spread, np.where(rms > 0, rms, np.float32(1)))


def _interpolate_log(table: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation in log(x) of a table of (x, y), clamped at both ends."""
    points = [(math.log(a), b) for a, b in table]
    t = min(max(math.log(x), points[0][0]), points[-1][0])
    return next(y0 + (y1 - y0) * (t - x0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(points, points[1:]) if t <= x1)


@dataclass
class EntropyQuant:
    """Uniform quantization with a step relative to the data's spread, shaped for zstd ("ecq").

    Each value becomes q = round(x / step), step = STEP x 1.4826 median |x| (over the tensor,
    or over each row with ``:row``). |q| <= 7 travels as a 4-bit symbol, two per byte, so
    zstd's byte-wise Huffman coding codes pairs of symbols and gets close to their entropy
    (about 1.6 bits per value at STEP 2 on Gaussian data, against 2 bits for fixed-rate
    2-bit quantization with a worse error). Larger |q| (outliers such as the huge channels
    of "attention sink" tokens) are escapes sent exactly in fp32. The decoder maps each
    symbol to the mean of the values that rounded to it (``levels``, in steps), which lowers
    the error of round-to-nearest (symbol 0 decodes to 0). Deterministic, and not unbiased, unlike ``quant``.
    Parts: ``values`` (ceil(n / 2),) uint8 symbols (low nibble first, 0 = escape, 8 + q
    otherwise), ``scales`` (1 or rows,) bf16 steps, ``levels`` (15,) fp16, ``outliers``
    (escapes,) fp32.
    """

    spec: str
    step: float
    per_row: bool
    order: ClassVar[int] = 2
    side_parts: ClassVar[tuple[str, ...]] = ("scales", "levels", "outliers")

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]:
        n = x.numel()
        rows = (_rows(x.float()) if self.per_row and n else x.float().reshape(1, -1)).numpy()  # numpy: ~5x faster here
        magnitude = np.abs(rows)
        if n and not np.isfinite(magnitude.max()):  # max propagates NaN
            raise ValueError(f"{self.spec}: cannot quantize a tensor with NaN or inf values")
        spread = _robust_spread(magnitude) if n else np.ones(1, dtype=np.float32)
        steps = torch.from_numpy(self.step * spread).to(torch.bfloat16)
        steps = torch.where(steps.float() > 0, steps, torch.full_like(steps, torch.finfo(torch.bfloat16).tiny))
        u = (rows * (1 / steps.float().numpy()[:, None])).reshape(-1)
        q = np.rint(u)
        np.clip(q, -ECQ_LIMIT - 1, ECQ_LIMIT + 1, out=q)  # inf from an overflowing product clips too
        q += 8
        symbols = q.astype(np.uint8)
        symbols[symbols == 2 * ECQ_LIMIT + 2] = 0  # 0: escape (|q| > 7), 8 + q otherwise
        escape = symbols == 0
        # Bin means from an evenly strided sample of <= 65536 values: as good an estimate, 5x faster.
        stride = -(-n // 65536) if n else 1
        sample, sampled_symbols = u[::stride], symbols[::stride]
        sums = np.bincount(sampled_symbols, weights=np.where(sampled_symbols == 0, np.float32(0), sample), minlength=16)
        counts = np.bincount(sampled_symbols, minlength=16)
        grid = np.arange(-ECQ_LIMIT, ECQ_LIMIT + 1, dtype=np.float64)
        levels = np.where(counts[1:] > 0, sums[1:] / np.maximum(counts[1:], 1), grid)
        levels[ECQ_LIMIT] = 0.0  # zeros stay exact: a row of zeros must not decode to a bin mean times its step
        if n % 2:
            symbols = np.append(symbols, np.uint8(8))
        packed = symbols[0::2] | (symbols[1::2] << 4)
        parts = {
            PAYLOAD: torch.from_numpy(packed),
            "scales": steps,
            "levels": torch.from_numpy(levels).to(torch.float16),
            "outliers": torch.from_numpy(rows.reshape(-1)[escape]),
        }
        return parts, {"numel": n, "rows": rows.shape[0]}

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor:
        n, rows = _meta_int(meta, "numel", self.spec), _meta_int(meta, "rows", self.spec)
        if rows == 0 or n % rows or (not self.per_row and rows != 1):
            raise CodecError(f"{self.spec}: {rows} rows cannot hold {n} values")
        packed = _check_part(parts, PAYLOAD, torch.uint8, (n + 1) // 2, self.spec)
        steps = _check_part(parts, "scales", torch.bfloat16, rows, self.spec).float()
        if not (torch.isfinite(steps).all() and (steps > 0).all()):
            raise CodecError(f"{self.spec}: steps must be finite and positive")
        levels = _check_part(parts, "levels", torch.float16, 2 * ECQ_LIMIT + 1, self.spec).double()
        grid = torch.arange(-ECQ_LIMIT, ECQ_LIMIT + 1, dtype=torch.float64)
        if not ((levels - grid).abs() <= 0.5 + 2**-8).all():  # a bin's mean lies in the bin (fp16 rounding aside)
            raise CodecError(f"{self.spec}: reconstruction levels must lie within half a step of their symbol")
        packed = packed.numpy()
        symbols = np.empty(2 * packed.size, dtype=np.uint8)
        symbols[0::2], symbols[1::2] = packed & 15, packed >> 4
        symbols = symbols[:n]
        escape = symbols == 0
        outliers = _check_part(parts, "outliers", torch.float32, int(escape.sum()), self.spec)
        table = np.concatenate([[0.0], levels.numpy()]).astype(np.float32)
        values = np.take(table, symbols).reshape(rows, -1)
        values *= steps.numpy()[:, None]
        values = values.reshape(-1)
        values[escape] = outliers.numpy()
        return torch.from_numpy(values)

    def estimate(self, numel: int, row_size: int) -> tuple[int, dict[str, tuple[float, float]]]:
        rows = max(1, numel // row_size) if self.per_row else 1
        escapes = numel * 2 * (1 - NormalDist().cdf((ECQ_LIMIT + 0.5) * self.step))
        payload = (numel + 1) // 2
        if self.step < ECQ_ZSTD_BITS[0][0]:
            coded = float(payload)  # many escapes: zstd finds little to remove
        else:
            coded = numel * _interpolate_log(ECQ_ZSTD_BITS, self.step) / 8
        return numel, {PAYLOAD: (payload, coded), "scales": (2 * rows, 2 * rows), "levels": (30, 30),
                       "outliers": (4 * escapes, 4 * escapes)}


@dataclass
class Zstd:
    """Lossless zstandard coding of one part's bytes. Part: ``values`` (compressed bytes,) uint8."""

    spec: str
    level: int
    order: ClassVar[int] = 3
    side_parts: ClassVar[tuple[str, ...]] = ()

    @cached_property
    def _compressor(self) -> zstandard.ZstdCompressor:
        return zstandard.ZstdCompressor(level=self.level)

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> tuple[Parts, Meta]:
        raw = x.contiguous().reshape(-1).view(torch.uint8).numpy() if x.numel() else b""  # an empty view may not be strided
        data = self._compressor.compress(raw)
        return {PAYLOAD: _bytes_tensor(data)}, {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}

    def decode(self, parts: Parts, meta: Meta) -> torch.Tensor:
        name = meta.get("dtype") if isinstance(meta, dict) else None
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise CodecError(f"{self.spec}: metadata dtype {name!r} is not one of {', '.join(DTYPES)}")
        shape = _meta_shape(meta, self.spec)
        expected = math.prod(shape) * dtype.itemsize
        frame = parts[PAYLOAD]
        if frame.dtype != torch.uint8 or frame.dim() != 1:
            raise CodecError(f"{self.spec}: compressed part must be 1-D uint8, got {frame.dtype} {list(frame.shape)}")
        data = frame.numpy()
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as error:
            raise CodecError(f"{self.spec}: not a zstd frame: {error}") from None
        if size != expected or expected > MAX_DECODED_BYTES:
            raise CodecError(f"{self.spec}: frame holds {size} bytes, metadata says {expected} ({dtype}, {shape})")
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
        except zstandard.ZstdError as error:
            raise CodecError(f"{self.spec}: corrupt zstd frame: {error}") from None
        if len(raw) != expected:
            raise CodecError(f"{self.spec}: frame decompressed to {len(raw)} bytes, expected {expected}")
        return _bytes_tensor(raw).view(dtype).reshape(shape)



# ---------------------------------------------------------------------------------------
# spec parsing
# ---------------------------------------------------------------------------------------
ALLOWED = (
    "none; or stages joined by '>' in this order: [center] > [topk:RATIO | topk_token:RATIO] > "
    "[fp16 | bf16 | quant:BITS[:BLOCK] | ecq:STEP[:row]] > [zstd[:LEVEL]], with RATIO in (0, 1], "
    "BITS in 1..8, BLOCK in 1..65536 (default 64), STEP in (0, 64], LEVEL in 1..22 (default 3); "
    "e.g. 'topk:0.1 > quant:4 > zstd' or 'center > ecq:2 > zstd'"
)


def _number(text: str, kind: type, low: float, high: float, what: str, stage: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise SpecError(f"{stage!r}: {what} {text!r} is not a{'n integer' if kind is int else ' number'}; allowed: {ALLOWED}") from None
    low_ok = value > low if kind is float else value >= low
    if not (low_ok and value <= high):
        bounds = f"({low:g}, {high:g}]" if kind is float else f"{low}..{high}"
        raise SpecError(f"{stage!r}: {what} {value} is outside {bounds}; allowed: {ALLOWED}")
    return value


def _parse_stage(stage: str) -> Codec:
    name, *args = [a.strip() for a in stage.split(":")]
    arity = {"center": (0, 0), "fp16": (0, 0), "bf16": (0, 0), "topk": (1, 1), "topk_token": (1, 1), "quant": (1, 2),
             "ecq": (1, 2), "zstd": (0, 1)}
    if name not in arity:
        raise SpecError(f"unknown codec {name!r} in {stage!r}; allowed: {ALLOWED}")
    least, most = arity[name]
    if not least <= len(args) <= most:
        raise SpecError(f"{stage!r}: {name} takes {least}..{most} arguments, got {len(args)}; allowed: {ALLOWED}")
    if name == "center":
        return Center(stage)
    if name == "ecq":
        if len(args) > 1 and args[1] != "row":
            raise SpecError(f"{stage!r}: the second argument of ecq can only be 'row' (a step per row), got {args[1]!r}; allowed: {ALLOWED}")
        return EntropyQuant(stage, _number(args[0], float, 0, 64, "STEP", stage), per_row=len(args) > 1)
    if name in ("fp16", "bf16"):
        return FloatCast(stage, torch.float16 if name == "fp16" else torch.bfloat16)
    if name in ("topk", "topk_token"):
        return TopK(stage, _number(args[0], float, 0, 1, "RATIO", stage), per_token=name == "topk_token")
    if name == "quant":
        bits = _number(args[0], int, 1, 8, "BITS", stage)
        block = _number(args[1], int, 1, 65536, "BLOCK", stage) if len(args) > 1 else 64
        return StochasticQuant(stage, bits, block)
    return Zstd(stage, _number(args[0], int, 1, 22, "LEVEL", stage) if args else 3)


@dataclass
class Encoded:
    """An encoded tensor: named parts (``PAYLOAD`` and side parts) and JSON-able metadata."""

    parts: Parts
    meta: Meta


class Pipeline:
    """The codecs of one spec, applied in order; decoding restores a dense fp32 tensor."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        text = spec.strip()
        stages = [] if text in ("", "none") else [_parse_stage(s.strip()) for s in text.split(">")]
        for before, after in zip(stages, stages[1:]):
            if after.order <= before.order:
                raise SpecError(f"{after.spec!r} cannot follow {before.spec!r} in {spec!r}; allowed: {ALLOWED}")
        self.lossless = stages.pop() if stages and isinstance(stages[-1], Zstd) else None
        self.transforms: list[Transform] = stages

    @property
    def is_identity(self) -> bool:
        return not self.transforms and self.lossless is None

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> Encoded:
        """Encode a float tensor of any shape."""
        if not x.is_floating_point():
            raise TypeError(f"codec pipeline {self.spec!r} encodes float tensors, got {x.dtype}")
        with _one_torch_thread():
            return self._encode(x, rng)

    def _encode(self, x: torch.Tensor, rng: torch.Generator) -> Encoded:
        payload = x.detach().float()
        parts: Parts = {}
        stages = []
        for codec in self.transforms:
            out, meta = codec.encode(payload, rng)
            payload = out.pop(PAYLOAD)
            parts.update(out)
            stages.append(meta)
        parts[PAYLOAD] = payload.contiguous()
        meta: Meta = {"spec": self.spec, "shape": list(x.shape), "stages": stages}
        if self.lossless is not None:
            coded = {name: self.lossless.encode(part, rng) for name, part in parts.items()}
            parts = {name: out[PAYLOAD] for name, (out, _) in coded.items()}
            meta["zstd"] = {name: m for name, (_, m) in coded.items()}
        return Encoded(parts, meta)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """Validate and decode; raise CodecError naming what is wrong."""
        with _one_torch_thread():
            return self._decode(encoded)

    def _decode(self, encoded: Encoded) -> torch.Tensor:
        meta, parts = encoded.meta, dict(encoded.parts)
        if not isinstance(meta, dict) or meta.get("spec") != self.spec:
            found = meta.get("spec") if isinstance(meta, dict) else meta
            raise CodecError(f"tensor was encoded with {found!r}, this side expects {self.spec!r}")
        shape = _meta_shape(meta, self.spec)
        stages = meta.get("stages")
        if not isinstance(stages, list) or len(stages) != len(self.transforms):
            raise CodecError(f"{self.spec}: metadata must list {len(self.transforms)} stages, got {stages!r}")
        expected = {PAYLOAD, *(p for codec in self.transforms for p in codec.side_parts)}
        if parts.keys() != expected:
            raise CodecError(f"{self.spec}: parts {sorted(parts)} do not match the expected {sorted(expected)}")
        if self.lossless is not None:
            coded = meta.get("zstd")
            if not isinstance(coded, dict) or coded.keys() != expected:
                raise CodecError(f"{self.spec}: zstd metadata must describe parts {sorted(expected)}")
            parts = {name: self.lossless.decode({PAYLOAD: part}, coded[name]) for name, part in parts.items()}
        payload = parts[PAYLOAD]
        for codec, stage_meta in zip(reversed(self.transforms), reversed(stages)):
            payload = codec.decode({PAYLOAD: payload, **{p: parts[p] for p in codec.side_parts}}, stage_meta)
        if payload.numel() != math.prod(shape) or not payload.is_floating_point():
            raise CodecError(f"{self.spec}: decoded {payload.numel()} {payload.dtype} values for shape {shape}")
        return payload.float().reshape(shape)

    def bytes_per_element(self, numel: int, row_size: int | None = None) -> float:
        """Expected encoded bytes per element of an fp32 tensor of ``numel`` elements (see module function)."""
        n, parts = numel, {PAYLOAD: (4.0 * numel, 4.0 * numel)}
        for codec in self.transforms:
            n, sizes = codec.estimate(n, row_size or numel)
            parts.update(sizes)
        if self.lossless is None:
            total = sum(raw for raw, _ in parts.values())
        else:
            total = sum(min(raw, coded) + ZSTD_FRAME_BYTES for raw, coded in parts.values())
        stages = len(self.transforms) + (self.lossless is not None)
        header = HEADER_BYTES_PER_PART * len(parts)
        if stages:
            header += HEADER_BYTES + len(self.spec) + HEADER_BYTES_PER_STAGE * stages
        return (total + header) / max(numel, 1)


def parse_pipeline(spec: str) -> Pipeline:
    """Parse a spec such as ``"topk:0.1 > quant:4 > zstd"``; raise SpecError listing what is allowed."""
    if not isinstance(spec, str):
        raise SpecError(f"a codec pipeline is a string, got {spec!r}; allowed: {ALLOWED}")
    return Pipeline(spec)


def bytes_per_element(pipeline_spec: str, numel: int, row_size: int | None = None) -> float:
    """Expected encoded bytes per element of an fp32 tensor of ``numel`` elements, header included.

    ``row_size`` is the last dimension (the hidden size), needed by ``topk_token``.
    Sizes of the parts are exact (payload, mask, scales) except under ``zstd``, which is
    estimated as: the quantized / cast payload and the scales do not compress (an upper
    bound; on Gaussian data zstd saves under 10% on them), the top-k bitmask compresses to
    the measured multiple ZSTD_MASK_FACTORS of its binary entropy H(k / n) bits per element,
    ``ecq`` symbols take the bits per element measured on Gaussian data (ECQ_ZSTD_BITS; real
    activations and gradients are heavier-tailed and take 10-25% more at the same STEP),
    plus a frame per part.
    The header (codec metadata and the message index entries of the parts) is a measured
    constant per stage and per part. Agreement with real encodings is tested.
    """
    return parse_pipeline(pipeline_spec).bytes_per_element(numel, row_size)


class ErrorFeedback:
    """Error feedback: what compression dropped from a stream's tensor is added to its next tensor.

    One residual per stream key (e.g. sender, direction, message kind, tensor name); a
    tensor of another shape than the residual restarts that stream from zero. The residual
    stays bounded for contractive pipelines (top-k, quantization to 3 bits or more); 1-bit
    stochastic quantization alone errs by more than the tensor and lets it grow.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.residuals: dict[tuple, torch.Tensor] = {}

    def encode(self, key: tuple, x: torch.Tensor, rng: torch.Generator) -> Encoded:
        target = x.detach().float()
        residual = self.residuals.get(key)
        if residual is not None and residual.shape == target.shape:
            target = target + residual
        encoded = self.pipeline.encode(target, rng)
        self.residuals[key] = target - self.pipeline.decode(encoded)
        return encoded

"""Codec calibration: the relative error of each codec pipeline on the configured model's real
activations and activation gradients, for the planners' accuracy limits.

An error model of i.i.d. Gaussian input misjudges real tensors by ~3x either way (SmolLM2's hidden
states carry a large per-channel offset and a few "attention sink" tokens with much of the energy;
gradients are heavy-tailed), so the planners measure instead. ``calibrate_codecs`` loads the
configured model (fp32 and frozen, as a run starts: LoRA adds nothing before its first step), takes
a few seeded batches of the configured data (``train.batch_size`` x ``train.seq_len``), runs them forward through the split stages and backward
from the token-mean loss, and encodes and decodes the tensors found at each cut with the real
pipelines (``splitfed.wire.codecs``).

Per stream (``activations`` sent up, ``gradients`` sent back), pipeline and cut it records two
errors of the decoded x̂ against x, both (batch, seq, hidden):

* ``tensor``: ||x̂ - x|| / ||x|| over the whole tensor, the mean over the batches (what a run's
  ``*_rel_error`` records per message);
* ``token_median``: the median over the batches' tokens of ||x̂_t - x_t|| / ||x_t|| of each token's
  (hidden,) vector, padding left out, and so are tokens whose vector is zero (the gradient at the last
  token of each row, which no loss depends on).

The two disagree on real tensors, in both directions: the whole-tensor error is dominated by the few
sink tokens, so top-k (which keeps their huge values) looks mild while a typical token loses half its
vector (SmolLM2, cut 4, gradients, ``topk:0.3 > quant:6``: 0.26 whole, 0.51 per token), and block
quantization looks worse than a typical token sees (activations, ``quant:4``: 0.45 whole, 0.35 per
token) because the sinks' blocks suffer most. The planners' limits bound ``CodecError.worst``, the
larger of the two, so that a pipeline passes only if both the typical token and the sinks (which every
token attends to) keep within the limit.

Cuts: one forward and backward pass yields the tensors at every cut, but each cut costs an encode
and decode per pipeline, stream and batch, so only a few cuts are measured (``calibration_cuts``:
five spread over the layers plus the configured ones) and ``CodecCalibration.at`` interpolates
linearly between them (the nearest measured cut outside their range).

Not modelled: error feedback (``compression.error_feedback``; it leaves each tensor's error alike);
LoRA's training (the tensors are the base model's); the gradient is that of a device served alone
(served together with others, its gradient is scaled by its share of the group's tokens, which
changes no relative error except through fp16's underflow of tiny values).
"""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from splitfed.config import RunConfig
from splitfed.data.batches import Batch, BatchStream, TokenDataset
from splitfed.data.partition import local_dataset
from splitfed.data.sources import load_documents
from splitfed.models.families import num_layers
from splitfed.models.loading import load_model, load_tokenizer
from splitfed.models.split import position_ids_for, split_model, token_loss_sum
from splitfed.seeding import Purpose, derive_seed
from splitfed.wire.codecs import parse_pipeline

STREAMS = ("activations", "gradients")
"""What crosses a cut: activations up (``compression.activations``), their gradients down (``compression.gradients``)."""
DEFAULT_BATCHES = 2
"""Batches measured: the errors differ little from batch to batch (SmolLM2, cut 4, ``quant:4``: 0.454 and
0.445 whole-tensor), and each batch costs a forward and backward pass of the whole model (SmolLM2 at 8 x
128 on 2 CPU cores: 4 s when the cores are free, 10-40 s when other processes load them)."""
DOCUMENTS, BATCHES, CODEC_DRAWS = 0, 1, 2
"""First index of the calibration's derived seeds (``Purpose.CODEC_CALIBRATION``) per use."""
CALIBRATION_DOCUMENTS = 4
"""Documents of ``data.source`` (drawn at random, seeded) whose rows the batches come from: a few batches
need no more, and tokenising all of Shakespeare's works would take longer than the measurement."""


@dataclass(frozen=True)
class CodecError:
    """The measured relative error of one pipeline on one stream at one cut (see the module docstring)."""

    stream: str
    spec: str
    cut: int
    tensor: float
    """||x̂ - x|| / ||x|| of the whole (batch, seq, hidden) tensor, mean over the batches."""
    token_median: float
    """Median over tokens of each token's (hidden,) relative error."""

    @property
    def worst(self) -> float:
        """The larger of the two errors: what the planners' accuracy limits bound."""
        return max(self.tensor, self.token_median)


@dataclass(frozen=True)
class CodecCalibration:
    """Measured errors of pipelines at a few cuts of one model, on batches of one data source."""

    model: str
    batches: int
    batch_size: int
    seq_len: int
    seed: int
    errors: tuple[CodecError, ...]

    @property
    def specs(self) -> frozenset[str]:
        return frozenset(e.spec for e in self.errors)

    @cached_property
    def _by_pipeline(self) -> dict[tuple[str, str], np.ndarray]:
        """(stream, spec) -> (3, measured cuts) rows cut, tensor, token_median, by cut (the planners look up
        thousands of errors)."""
        rows: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
        for e in self.errors:
            rows.setdefault((e.stream, e.spec), []).append((e.cut, e.tensor, e.token_median))
        return {key: np.array(sorted(values)).T for key, values in rows.items()}

    def at(self, stream: str, spec: str, cut: int) -> CodecError:
        """The errors of ``spec`` on ``stream`` at ``cut``: linear between the measured cuts, the nearest
        measured cut's beyond them."""
        if (stream, spec) not in self._by_pipeline:
            raise KeyError(f"codec pipeline {spec!r} was not calibrated on {stream}; calibrated: {sorted(self.specs)}")
        cuts, tensor, token_median = self._by_pipeline[(stream, spec)]
        return CodecError(stream, spec, cut, float(np.interp(cut, cuts, tensor)), float(np.interp(cut, cuts, token_median)))

    def merged(self, other: CodecCalibration) -> CodecCalibration:
        """This calibration with ``other``'s pipelines added (for pipelines measured later, on the same setup)."""
        known = {(e.stream, e.spec) for e in self.errors}
        added = tuple(e for e in other.errors if (e.stream, e.spec) not in known)
        return CodecCalibration(self.model, self.batches, self.batch_size, self.seq_len, self.seed,
                                self.errors + added)


def calibration_cuts(total_layers: int, configured: Iterable[int] = ()) -> list[int]:
    """Cuts to measure: 1, the quartiles of the layers and L - 1, plus the ``configured`` cuts (those within
    1..L-1); a model of up to 6 layers gets every cut."""
    highest = total_layers - 1
    spread = {min(max(1, round(total_layers * q)), highest) for q in (0.0, 0.25, 0.5, 0.75, 1.0)}
    return sorted(spread | {c for c in configured if 1 <= c <= highest}) if highest >= 1 else []


def calibration_data(config: RunConfig, tokenizer: object) -> TokenDataset:
    """Rows of up to ``CALIBRATION_DOCUMENTS`` documents of ``data.source`` (``data.documents`` if set),
    drawn with the run seed and tokenised as a device tokenises its own files."""
    data = config.data
    documents = load_documents(data.source, data.documents or None)
    rng = np.random.default_rng(derive_seed(config.seed, Purpose.CODEC_CALIBRATION, DOCUMENTS))
    chosen = sorted(rng.permutation(len(documents))[:CALIBRATION_DOCUMENTS])
    return local_dataset([documents[i] for i in chosen], tokenizer, config.train.seq_len, data.truncation,
                         data.template)


def boundary_tensors(model: nn.Module, batch: Batch, cuts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(activations, gradients) at each of ``cuts`` (strictly increasing), each (batch, seq, hidden): the
    output of the stage before the cut, and the gradient of the batch's token-mean loss with respect to it
    (what the last stage sends back to a device served alone)."""
    stages = split_model(model, list(cuts))
    positions = position_ids_for(batch.attention_mask)
    hidden, boundaries = batch.input_ids, []
    for stage in stages:
        hidden = stage(hidden, batch.attention_mask, positions)
        if not stage.spec.last:
            if not boundaries:  # the base is frozen: autograd starts at the first cut
                hidden = hidden.detach().requires_grad_(True)
            hidden.retain_grad()
            boundaries.append(hidden)
    loss_sum, tokens = token_loss_sum(hidden, batch.labels)
    (loss_sum / max(tokens, 1)).backward()
    return [(b.detach(), b.grad) for b in boundaries]


def relative_errors(x: torch.Tensor, decoded: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Whole-tensor ||decoded - x|| / ||x|| (0 for a zero tensor) and each counted token's relative error
    (tokens,): x, decoded (batch, seq, hidden); attention_mask (batch, seq), padding 0."""
    difference = torch.linalg.vector_norm(decoded - x, dim=-1)  # (batch, seq)
    norm = torch.linalg.vector_norm(x, dim=-1)
    total = float(torch.linalg.vector_norm(norm))
    whole = float(torch.linalg.vector_norm(difference)) / total if total > 0 else 0.0
    counted = (attention_mask > 0) & (norm > 0)
    return whole, difference[counted] / norm[counted]


def _median(values: torch.Tensor) -> float:
    """Median of a 1-d tensor (the mean of the middle two for an even count); 0 when empty."""
    return float(np.median(values.numpy())) if values.numel() else 0.0


def calibrate_codecs(config: RunConfig, specs: Sequence[str], cuts: Sequence[int] | None = None, *,
                     batches: int = DEFAULT_BATCHES, progress: Callable[[str], None] | None = None) -> CodecCalibration:
    """Measure every pipeline of ``specs`` on both streams at ``cuts`` (default: ``calibration_cuts`` of the
    configured ``devices.cuts``) over ``batches`` batches of ``train.batch_size`` x ``train.seq_len``;
    deterministic for ``config.seed``. ``progress`` gets a line before the model loads and after each batch."""
    if batches < 1:
        raise ValueError(f"codec calibration: batches must be at least 1, got {batches}")
    if not specs:
        raise ValueError("codec calibration: no pipeline specs to measure")
    pipelines = [parse_pipeline(spec) for spec in specs]  # a SpecError names a bad spec and what is allowed
    spec_keys = [zlib.crc32(spec.encode()) for spec in specs]  # a pipeline's draws do not depend on the others
    model_source, train = config.model.source, config.train
    if progress is not None:
        progress(f"calibrating {len(specs)} codec pipelines on {model_source} ({batches} batches of "
                 f"{train.batch_size} x {train.seq_len}): loading the model")
    model = load_model(model_source)
    total = num_layers(model.config)
    cuts = sorted(set(calibration_cuts(total, config.devices.cuts) if cuts is None else cuts))
    bad = [c for c in cuts if not 1 <= c < total]
    if bad or not cuts:
        raise ValueError(f"codec calibration: cuts {bad or cuts} are not cuts of this {total}-layer model; "
                         f"allowed: 1..{total - 1}")
    stream = BatchStream(calibration_data(config, load_tokenizer(model_source)), train.batch_size,
                         derive_seed(config.seed, Purpose.CODEC_CALIBRATION, BATCHES))
    whole: dict[tuple[int, int, int], list[float]] = {}  # (stream, spec, cut) index -> per batch
    tokens: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    for b in range(batches):
        batch = stream.next_batch()
        for c, tensors in enumerate(boundary_tensors(model, batch, cuts)):
            for s, x in enumerate(tensors):
                for p, pipeline in enumerate(pipelines):
                    rng = torch.Generator().manual_seed(derive_seed(
                        config.seed, Purpose.CODEC_CALIBRATION, CODEC_DRAWS, b, cuts[c], s, spec_keys[p]))
                    error, per_token = relative_errors(x, pipeline.decode(pipeline.encode(x, rng)),
                                                       batch.attention_mask)
                    whole.setdefault((s, p, c), []).append(error)
                    tokens.setdefault((s, p, c), []).append(per_token)
        if progress is not None:
            progress(f"  batch {b + 1}/{batches}: {len(specs)} pipelines x {len(STREAMS)} streams at cuts {cuts}")
    errors = tuple(
        CodecError(STREAMS[s], specs[p], cuts[c], statistics.fmean(whole[(s, p, c)]),
                   _median(torch.cat(tokens[(s, p, c)])))
        for s in range(len(STREAMS)) for p in range(len(specs)) for c in range(len(cuts))
    )
    return CodecCalibration(model_source, batches, train.batch_size, train.seq_len, config.seed, errors)

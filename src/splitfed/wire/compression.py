"""Compression of whole messages on the wire: which tensors of which message go through which codec.

Both ends of any link use one ``MessageCodec``: the in-process link, the server's handles
of remote devices and the device processes (gRPC or Ray). The sender ``pack``s a message
before it is encoded to bytes, the receiver ``unpack``s it after decoding:

- activations' ``hidden`` go through ``compression.activations`` (or the device's entry of
  ``compression.activations_per_device``), ``activation_grad``'s ``grad`` through
  ``compression.gradients`` (or ``gradients_per_device``), every adapter tensor of
  ``adapter_upload`` / ``adapter_download`` through ``compression.adapters``;
- a compressed tensor ``name`` travels as its payload under ``name``, its side parts under
  ``name#part``, the codec metadata as the JSON value ``name#codec`` and the sender's
  measured relative error as the value ``name#error``; the receiver gets the dense tensor back,
  activations and their gradients in the run's activation dtype (``compute.dtype``), adapters in fp32.

Stochastic codecs draw from a generator seeded by the message's identity (seed, direction,
device, round, step, kind, tensor), so both runtimes and resumed runs draw alike. With
error feedback, each sender keeps the residual of each of its streams; ``export_state``
puts them in checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from splitfed.wire.codecs import PAYLOAD, CodecError, Encoded, ErrorFeedback, Pipeline, parse_pipeline
from splitfed.wire.messages import Message



class CompressionSpecs(Protocol):
    """What the codec reads of a run's ``compression`` config section."""

    error_feedback: bool

    def pipeline_spec(self, stream: str, device: int) -> str: ...


# message kind -> (stream, tensor it compresses; None: every tensor)
ROUTES: dict[str, tuple[str, str | None]] = {
    "activations": ("activations", "hidden"),
    "activation_grad": ("gradients", "grad"),
    "adapter_upload": ("adapters", None),
    "adapter_download": ("adapters", None),
}
STREAMS = ("activations", "gradients", "adapters")
SEP = "#"
DIRECTIONS = ("up", "down")


@dataclass
class _Tally:
    """Compression statistics of one stream since the last ``take_stats``."""

    bytes: int = 0
    fp32_bytes: int = 0
    error_sum: float = 0.0
    messages: int = 0


def routed(message: Message) -> list[str]:
    """Names of the tensors of ``message`` that its stream's pipeline applies to."""
    if message.kind not in ROUTES:
        return []
    name = ROUTES[message.kind][1]
    if name is None:
        return [n for n in message.tensors if SEP not in n]
    return [name] if name in message.tensors else []


class MessageCodec:
    """Packs and unpacks the compressed tensors of messages, and tallies compression statistics."""

    def __init__(self, compression: CompressionSpecs, seed: int, activation_dtype: torch.dtype = torch.float32) -> None:
        self.compression = compression
        self.seed = seed
        self.activation_dtype = activation_dtype
        """What decoded activations and activation gradients are cast to (the base model's dtype)."""
        self._pipelines: dict[str, Pipeline] = {}
        self._feedback: dict[str, ErrorFeedback] = {}
        self._tallies = {s: _Tally() for s in STREAMS}

    def pipeline(self, kind: str, device: int) -> Pipeline | None:
        """The pipeline a message of ``kind`` to/from ``device`` goes through; None when sent as it is."""
        if kind not in ROUTES:
            return None
        spec = self.compression.pipeline_spec(ROUTES[kind][0], device)
        if spec not in self._pipelines:
            self._pipelines[spec] = parse_pipeline(spec)
        pipeline = self._pipelines[spec]
        return None if pipeline.is_identity else pipeline

    def _encode(self, pipeline: Pipeline, key: tuple, x: torch.Tensor, rng: torch.Generator) -> Encoded:
        if not self.compression.error_feedback:
            return pipeline.encode(x, rng)
        if pipeline.spec not in self._feedback:
            self._feedback[pipeline.spec] = ErrorFeedback(pipeline)
        return self._feedback[pipeline.spec].encode(key, x, rng)

    def _rng(self, direction: str, device: int, message: Message, index: int) -> torch.Generator:
        """A generator that depends only on the message's identity: runs and resumed runs draw alike."""
        kind = list(ROUTES).index(message.kind)
        entropy = [self.seed, int(direction == "up"), device, message.round, message.step, kind, index]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    # --- sender ---------------------------------------------------------------------------
    def pack(self, direction: str, device: int, message: Message) -> Message:
        """Compress the routed tensors of a message that ``device`` sends (up) or receives (down)."""
        names, pipeline = routed(message), self.pipeline(message.kind, device)
        if not names or pipeline is None:
            return message
        tensors, values = dict(message.tensors), dict(message.values)
        for index, name in enumerate(names):
            original = tensors.pop(name).detach().to("cpu", torch.float32)  # codecs work on fp32 host tensors
            key = (direction, device, message.kind, name)
            encoded = self._encode(pipeline, key, original, self._rng(direction, device, message, index))
            tensors.update({name if part == PAYLOAD else f"{name}{SEP}{part}": t for part, t in encoded.parts.items()})
            values[f"{name}{SEP}codec"] = json.dumps(encoded.meta)
            values[f"{name}{SEP}error"] = _relative_error(original, pipeline.decode(encoded))
        return Message(message.kind, message.sender, message.round, message.step, tensors, values)

    # --- receiver -------------------------------------------------------------------------
    def unpack(self, device: int, message: Message) -> Message:
        """Restore the dense tensors of a packed message; CodecError if it does not decode."""
        names, pipeline = routed(message), self.pipeline(message.kind, device)
        if not names or pipeline is None:
            return message
        dtype = self.activation_dtype if ROUTES[message.kind][0] != "adapters" else torch.float32
        tensors, values = dict(message.tensors), dict(message.values)
        for name in names:
            raw_meta = values.pop(f"{name}{SEP}codec", None)
            values.pop(f"{name}{SEP}error", None)
            if not isinstance(raw_meta, str):
                raise CodecError(f"{message.kind}: tensor {name!r} arrived without codec metadata; expected {pipeline.spec!r}")
            try:
                meta = json.loads(raw_meta)
            except ValueError as error:
                raise CodecError(f"{message.kind}: codec metadata of {name!r} is not JSON: {error}") from None
            prefix = f"{name}{SEP}"
            parts = {PAYLOAD: tensors.pop(name)}
            parts.update({k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]})
            tensors[name] = pipeline.decode(Encoded(parts, meta)).to(dtype)
        return Message(message.kind, message.sender, message.round, message.step, tensors, values)

    # --- statistics -----------------------------------------------------------------------
    def tally(self, packed: Message, nbytes: int) -> None:
        """Count a packed message of ``nbytes`` on the wire in its stream's statistics."""
        names = routed(packed)
        if not names:
            return
        tally = self._tallies[ROUTES[packed.kind][0]]
        tally.bytes += nbytes
        errors = []
        for name in names:
            raw_meta = packed.values.get(f"{name}{SEP}codec")
            shape = json.loads(raw_meta)["shape"] if isinstance(raw_meta, str) else packed.tensors[name].shape
            tally.fp32_bytes += 4 * math.prod(shape)
            error = packed.values.get(f"{name}{SEP}error")
            if isinstance(error, (int, float)) and math.isfinite(error) and error >= 0:
                errors.append(float(error) ** 2)
        # The message's error: root mean square of the sender's per-tensor errors (0 when uncompressed).
        tally.error_sum += math.sqrt(sum(errors) / len(errors)) if errors else 0.0
        tally.messages += 1

    def take_stats(self) -> dict[str, float | int | None]:
        """Per stream since the last call: ``{s}_bytes`` (encoded messages, header included),
        ``{s}_fp32_bytes`` (the compressed tensors as fp32), ``{s}_ratio`` (bytes / fp32 bytes)
        and ``{s}_rel_error`` (mean over messages of the RMS over their tensors of ||decoded - sent|| /
        ||sent||, as measured by the sender); then reset."""
        stats: dict[str, float | int | None] = {}
        for stream, tally in self._tallies.items():
            stats[f"{stream}_bytes"] = tally.bytes
            stats[f"{stream}_fp32_bytes"] = tally.fp32_bytes
            stats[f"{stream}_ratio"] = tally.bytes / tally.fp32_bytes if tally.fp32_bytes else None
            stats[f"{stream}_rel_error"] = tally.error_sum / tally.messages if tally.messages else None
        self._tallies = {s: _Tally() for s in STREAMS}
        return stats

    # --- checkpoints ----------------------------------------------------------------------
    def export_state(self, device: int | None = None) -> dict[str, torch.Tensor]:
        """Error-feedback residuals kept on this side (of one ``device``, or all), named
        ``spec|direction|device|kind|tensor``."""
        return {
            "|".join([spec, direction, str(owner), kind, name]): residual
            for spec, feedback in self._feedback.items()
            for (direction, owner, kind, name), residual in feedback.residuals.items()
            if device is None or owner == device
        }

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore residuals written by ``export_state`` (added to those already kept)."""
        for key, residual in tensors.items():
            spec, direction, device, kind, name = key.split("|", 4)
            pipeline = self._pipelines.setdefault(spec, parse_pipeline(spec))
            feedback = self._feedback.setdefault(spec, ErrorFeedback(pipeline))
            feedback.residuals[(direction, int(device), kind, name)] = residual


def _relative_error(sent: torch.Tensor, received: torch.Tensor) -> float:
    """||received - sent|| / ||sent|| (0 for an all-zero tensor)."""
    sent = sent.detach().float()
    norm = float(sent.square().sum())
    return float((received - sent).square().sum() / norm) ** 0.5 if norm > 0 else 0.0


def compression_summary(rounds: list[dict]) -> dict[str, float | int | None]:
    """Run totals of the round records' compression statistics (for summary.json)."""
    summary: dict[str, float | int | None] = {}
    for stream in STREAMS:
        sent = sum(r.get(f"{stream}_bytes", 0) for r in rounds)
        fp32 = sum(r.get(f"{stream}_fp32_bytes", 0) for r in rounds)
        errors = [r[f"{stream}_rel_error"] for r in rounds if r.get(f"{stream}_rel_error") is not None]
        summary[f"{stream}_bytes"] = sent
        summary[f"{stream}_ratio"] = sent / fp32 if fp32 else None
        summary[f"{stream}_rel_error"] = sum(errors) / len(errors) if errors else None
    return summary

"""In-process runtime: delivers messages between roles in one process, deterministically.

Every message is encoded to bytes and decoded again exactly as a network runtime would,
so the byte counters are the real encoded sizes and roles never share tensor objects.

The link also applies the codec pipelines of ``compression.*`` (splitfed.wire.codecs):
activations' ``hidden`` with ``compression.activations``, ``activation_grad``'s ``grad``
with ``compression.gradients`` and every adapter tensor with ``compression.adapters``.
A compressed tensor ``name`` travels as its payload under ``name``, side parts under
``name#part`` and the codec metadata as the JSON value ``name#codec``; the receiver gets
dense fp32 tensors back. Roles never see codecs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from splitfed.config import CompressionSection
from splitfed.wire.codecs import PAYLOAD, CodecError, Encoded, ErrorFeedback, Pipeline, parse_pipeline
from splitfed.wire.messages import Message, decode, encode

# message kind -> (compression field, tensor it compresses; None: every tensor)
ROUTES: dict[str, tuple[str, str | None]] = {
    "activations": ("activations", "hidden"),
    "activation_grad": ("gradients", "grad"),
    "adapter_upload": ("adapters", None),
    "adapter_download": ("adapters", None),
}
STREAMS = ("activations", "gradients", "adapters")
SEP = "#"


@dataclass
class _Tally:
    """Compression statistics of one stream since the last ``take_stats``."""

    bytes: int = 0
    fp32_bytes: int = 0
    error_sum: float = 0.0
    messages: int = 0


class ByteCounts:
    """Bytes on the wire: ``total_up`` / ``total_down`` only grow; per-device counts are taken
    (and reset) by whoever writes a per-step record."""

    def __init__(self) -> None:
        self.total_up = 0
        self.total_down = 0
        self._up: dict[int, int] = defaultdict(int)
        self._down: dict[int, int] = defaultdict(int)

    def record(self, device: int, up: int = 0, down: int = 0) -> None:
        self.total_up, self.total_down = self.total_up + up, self.total_down + down
        self._up[device] += up
        self._down[device] += down

    def take_counts(self, device: int) -> tuple[int, int]:
        """Bytes (up, down) of ``device`` since the last call, then reset them."""
        return self._up.pop(device, 0), self._down.pop(device, 0)

    def clear_pending(self) -> None:
        """Forget per-device counts (e.g. adapter traffic that belongs to no step)."""
        self._up.clear()
        self._down.clear()


class InProcessLink(ByteCounts):
    """Carries messages up (device -> server) and down (server -> device), compresses and counts bytes.

    ``total_up`` / ``total_down`` only grow; the per-device counters are taken (and reset)
    by whoever writes a per-step record, the compression statistics by the round record.
    """

    def __init__(self, compression: CompressionSection | None = None, seed: int = 0) -> None:
        compression = compression or CompressionSection()
        self.seed = seed
        self.pipelines: dict[str, Pipeline] = {s: parse_pipeline(getattr(compression, s)) for s in STREAMS}
        self.feedback = (
            {s: ErrorFeedback(p) for s, p in self.pipelines.items() if not p.is_identity}
            if compression.error_feedback
            else {}
        )
        super().__init__()
        self._tallies = {s: _Tally() for s in STREAMS}

    def up(self, device: int, message: Message) -> Message:
        data = encode(self._compress("up", device, message))
        self.record(device, up=len(data))
        return self._receive(data, message)

    def down(self, device: int, message: Message) -> Message:
        data = encode(self._compress("down", device, message))
        self.record(device, down=len(data))
        return self._receive(data, message)



    def take_stats(self) -> dict[str, float | int | None]:
        """Per stream since the last call: ``{s}_bytes`` (encoded messages, header included),
        ``{s}_fp32_bytes`` (the compressed tensors as fp32), ``{s}_ratio`` (bytes / fp32 bytes)
        and ``{s}_rel_error`` (mean ||decoded - sent|| / ||sent|| per message); then reset."""
        stats: dict[str, float | int | None] = {}
        for stream, tally in self._tallies.items():
            stats[f"{stream}_bytes"] = tally.bytes
            stats[f"{stream}_fp32_bytes"] = tally.fp32_bytes
            stats[f"{stream}_ratio"] = tally.bytes / tally.fp32_bytes if tally.fp32_bytes else None
            stats[f"{stream}_rel_error"] = tally.error_sum / tally.messages if tally.messages else None
        self._tallies = {s: _Tally() for s in STREAMS}
        return stats

    # --- codecs -----------------------------------------------------------------------------
    @staticmethod
    def _routed(message: Message) -> list[str]:
        """Names of the tensors of ``message`` that its stream's pipeline applies to."""
        if message.kind not in ROUTES:
            return []
        name = ROUTES[message.kind][1]
        if name is None:
            return [n for n in message.tensors if SEP not in n]
        return [name] if name in message.tensors else []

    def _rng(self, direction: str, device: int, message: Message, index: int) -> torch.Generator:
        """A generator that depends only on the message's identity: runs and resumed runs draw alike."""
        kind = list(ROUTES).index(message.kind)
        entropy = [self.seed, int(direction == "up"), device, message.round, message.step, kind, index]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def _pipeline(self, message: Message) -> Pipeline | None:
        """The pipeline that ``message`` goes through, or None when it is sent as it is."""
        pipeline = self.pipelines[ROUTES[message.kind][0]] if message.kind in ROUTES else None
        return None if pipeline is None or pipeline.is_identity else pipeline

    def _compress(self, direction: str, device: int, message: Message) -> Message:
        names, pipeline = self._routed(message), self._pipeline(message)
        if not names or pipeline is None:
            return message
        feedback = self.feedback.get(ROUTES[message.kind][0])
        tensors, values = dict(message.tensors), dict(message.values)
        for index, name in enumerate(names):
            rng = self._rng(direction, device, message, index)
            key = (direction, device, message.kind, name)
            encoded = feedback.encode(key, tensors[name], rng) if feedback else pipeline.encode(tensors[name], rng)
            del tensors[name]
            tensors.update({name if part == PAYLOAD else f"{name}{SEP}{part}": t for part, t in encoded.parts.items()})
            values[f"{name}{SEP}codec"] = json.dumps(encoded.meta)
        return Message(message.kind, message.sender, message.round, message.step, tensors, values)

    def _receive(self, data: bytes, sent: Message) -> Message:
        """Decode ``data``, restore dense tensors, and tally the stream's statistics against ``sent``."""
        message = self._decompress(decode(data))
        names = self._routed(message)
        if names:
            tally = self._tallies[ROUTES[message.kind][0]]
            tally.bytes += len(data)
            tally.fp32_bytes += sum(4 * message.tensors[n].numel() for n in names)
            if self._pipeline(message) is not None:
                tally.error_sum += _relative_error([sent.tensors[n] for n in names], [message.tensors[n] for n in names])
            tally.messages += 1
        return message

    def _decompress(self, message: Message) -> Message:
        names, pipeline = self._routed(message), self._pipeline(message)
        if not names or pipeline is None:
            return message
        tensors, values = dict(message.tensors), dict(message.values)
        for name in names:
            raw_meta = values.pop(f"{name}{SEP}codec", None)
            if not isinstance(raw_meta, str):
                raise CodecError(f"{message.kind}: tensor {name!r} arrived without codec metadata; expected {pipeline.spec!r}")
            try:
                meta = json.loads(raw_meta)
            except ValueError as error:
                raise CodecError(f"{message.kind}: codec metadata of {name!r} is not JSON: {error}") from None
            prefix = f"{name}{SEP}"
            parts = {PAYLOAD: tensors.pop(name)}
            parts.update({k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]})
            tensors[name] = pipeline.decode(Encoded(parts, meta))
        return Message(message.kind, message.sender, message.round, message.step, tensors, values)


def _relative_error(sent: list[torch.Tensor], received: list[torch.Tensor]) -> float:
    """||received - sent|| / ||sent|| over the tensors of one message (0 for an all-zero message)."""
    diff = sum(float((r - s.detach().float()).square().sum()) for s, r in zip(sent, received))
    norm = sum(float(s.detach().float().square().sum()) for s in sent)
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


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

"""Bad messages generated from the schemas (``wire.schema.SCHEMAS``), for fuzz tests.

``bad_payloads(kind, bounds, rng)`` starts from a valid message of ``kind`` under ``bounds``
and breaks one thing of it: a value (missing, of the wrong type, NaN, out of range, not
among the choices, unknown), a tensor (missing, extra, wrong dtype, rank, size or batch,
NaN, integers out of range) or the header itself (kind, sender, round, values, nesting,
truncation, random bytes). Every payload it yields is refused by ``decode`` + ``check``
(tests/wire/test_schema.py asserts that), so a receiver that acts on one has a hole.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import save as save_tensors

from splitfed.wire.messages import KINDS, Message, encode
from splitfed.wire.schema import BATCH, SCHEMAS, Bounds, ValueSpec

SAMPLE_VALUES = {"reason": "refused", "op": "report", "meta": "{}", "num_samples": 3, "since": 0, "version": 1,
                 "routes": '{"0": [2, 1.5, 100, 1.0]}'}


def valid_message(kind: str, bounds: Bounds, sender: str = "device0", batch: int = 2) -> Message:
    """A message of ``kind`` that passes ``check`` under ``bounds``."""
    schema = SCHEMAS[kind]
    values = {name: SAMPLE_VALUES.get(name, _in_range(spec)) for name, spec in schema.required.items()}
    tensors: dict[str, torch.Tensor] = {}
    if schema.tensors is not None:
        for name, spec in schema.tensors(bounds).items():
            shape = tuple(batch if s == BATCH else s for s in spec.shape)
            if spec.dtype.is_floating_point:
                tensors[name] = torch.randn(shape)
            else:
                tensors[name] = torch.randint(spec.value_range[0], spec.value_range[1], shape, dtype=spec.dtype)
    if schema.state_tensors:
        tensors["slot/adapter/a"] = torch.zeros(2, 3)
    known = bounds.merge_modules or {"fuzz.proj": (bounds.hidden_size, bounds.hidden_size)}
    if schema.score_tensors:  # a score for the first module the sender holds (or for none it holds)
        tensors[next(iter(known))] = torch.tensor([0.5], dtype=torch.float64)
    if schema.merge_tensors:  # merge 0 of the first module the receiver holds (or of none it holds), at rank 2
        module, (out_features, in_features) = next(iter(known.items()))
        tensors[f"0/{module}.lora_A.weight"] = torch.randn(2, in_features)
        tensors[f"0/{module}.lora_B.weight"] = torch.randn(out_features, 2)
    return Message(kind, sender, 1, 2, tensors, values)


def _in_range(spec: ValueSpec) -> float | int:
    value = min(spec.high, spec.low + 1) if math.isfinite(spec.low) else 0.5
    return int(value) if spec.type is int else float(value)


def _raw(header: object, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A payload whose splitfed header is ``header`` as given (a dict, a list, anything JSON)."""
    return save_tensors(tensors or {}, metadata={"splitfed": json.dumps(header)})


def _header(message: Message) -> dict:
    return {"kind": message.kind, "sender": message.sender, "round": message.round, "step": message.step,
            "values": dict(message.values)}


Mutation = Callable[[Message, Bounds, random.Random], tuple[str, bytes] | None]


def _value_mutations(message: Message, bounds: Bounds, rng: random.Random) -> tuple[str, bytes] | None:
    schema = SCHEMAS[message.kind]
    specs = {**schema.required, **schema.optional}
    choices: list[tuple[str, object]] = [("unknown value", ("x_unknown", 1))]
    for name, spec in specs.items():
        choices.append(("string for a number" if spec.type is not str else "number for a string",
                        (name, "1.0" if spec.type is not str else 7)))
        if spec.type is str:
            choices.append(("string too long", (name, "x" * (spec.max_chars + 1))))
            if spec.choices:
                choices.append(("not a choice", (name, "format_disk")))
            if spec.json_object:
                choices += [("meta not JSON", (name, "{not json")), ("meta a JSON list", (name, "[1, 2]")),
                            ("meta deeply nested", (name, "[" * 100_000 + "]" * 100_000))]
        else:
            choices += [("NaN", (name, math.nan)), ("infinity", (name, math.inf)),
                        ("below the range", (name, spec.low - rng.randint(1, 10**6))),
                        ("boolean", (name, True))]
            if math.isfinite(spec.high):
                choices.append(("above the range", (name, spec.high + rng.randint(1, 10**6))))
            if spec.type is int:
                choices.append(("fraction for an integer", (name, spec.low + 0.5)))
    for name in schema.required:
        choices.append(("missing value", (name, None)))
    what, (name, value) = rng.choice(choices)
    header = _header(message)
    if value is None:
        header["values"].pop(name)
    else:
        header["values"][name] = value
    return f"{message.kind}: {what} {name}", _raw(header, message.tensors)


def _tensor_mutations(message: Message, bounds: Bounds, rng: random.Random) -> tuple[str, bytes] | None:
    tensors = dict(message.tensors)
    if not tensors or SCHEMAS[message.kind].state_tensors:
        name = rng.choice(["hidden", "x", "slot/adapter/a"])
        if SCHEMAS[message.kind].state_tensors:
            bad = rng.choice([torch.full((3,), math.nan), torch.zeros(2, dtype=torch.int16), torch.full((2,), math.inf)])
            return f"{message.kind}: bad state tensor", encode(Message(message.kind, message.sender, 1, 2,
                                                                       {name: bad}, message.values))
        return f"{message.kind}: a tensor where none belongs", encode(
            Message(message.kind, message.sender, 1, 2, {name: torch.zeros(2, 2)}, message.values))
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    options: list[tuple[str, torch.Tensor | None]] = [
        ("missing tensor", None),
        ("wrong dtype", t.to(torch.float64) if not t.dtype.is_floating_point else t.to(torch.float16)),
        ("extra axis", t.unsqueeze(0)),
        ("axis too long", torch.cat([t, t[..., :1]], dim=-1)),
        ("scalar", t.reshape(-1)[:1].reshape(())),
    ]
    if t.dim() >= 1 and t.shape[0] >= 1 and name in ("hidden", "attention_mask", "labels", "grad"):
        options.append(("batch above the limit", t[:1].expand(bounds.max_batch + rng.randint(1, 5), *t.shape[1:]).clone()))
        options.append(("empty batch", t[:0]))
    if t.dtype.is_floating_point:
        bad = t.clone()
        bad.view(-1)[rng.randrange(bad.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        options.append(("non-finite value", bad))
    else:
        bad = t.clone()
        bad.view(-1)[rng.randrange(bad.numel())] = rng.choice([-1, -7, 2, 10**9, bounds.vocab_size])
        if name == "labels":
            bad.view(-1)[0] = rng.choice([-1, -101, bounds.vocab_size, 10**9])
        options.append(("integer out of range", bad))
    if len(tensors) > 1:
        other = rng.choice(sorted(set(tensors) - {name}))
        options.append(("batch differs between tensors", torch.cat([tensors[other]] * 2)[: tensors[other].shape[0] + 1]))
        name_for_mismatch = other
    options.append(("extra tensor", torch.zeros(1)))
    what, replacement = rng.choice(options)
    if what == "missing tensor":
        tensors.pop(name)
    elif what == "extra tensor":
        tensors["intruder"] = replacement
    elif what == "batch differs between tensors":
        tensors[name_for_mismatch] = replacement
    else:
        tensors[name] = replacement
    return f"{message.kind}: {what} ({name})", encode(Message(message.kind, message.sender, message.round,
                                                              message.step, tensors, message.values))


def _header_mutations(message: Message, bounds: Bounds, rng: random.Random) -> tuple[str, bytes] | None:
    header = _header(message)
    good = encode(message)
    options: list[tuple[str, Callable[[], bytes]]] = [
        ("kind unknown", lambda: _raw({**header, "kind": "gossip"})),
        ("kind a list", lambda: _raw({**header, "kind": [message.kind]})),
        ("kind very long", lambda: _raw({**header, "kind": message.kind * 50_000})),
        ("sender a number", lambda: _raw({**header, "sender": 3})),
        ("sender very long", lambda: _raw({**header, "sender": "d" * 5000})),
        ("round negative", lambda: _raw({**header, "round": -rng.randint(1, 100)})),
        ("round a string", lambda: _raw({**header, "round": "1"})),
        ("step huge", lambda: _raw({**header, "step": 2**40})),
        ("values a number", lambda: _raw({**header, "values": 5})),
        ("values a list", lambda: _raw({**header, "values": [1, 2]})),
        ("a value nested", lambda: _raw({**header, "values": {**header["values"], "x": {"y": [1]}}})),
        ("unknown header field", lambda: _raw({**header, "admin": True})),
        ("header a list", lambda: _raw([header])),
        ("header deeply nested", lambda: save_tensors({}, metadata={"splitfed": "[" * 200_000 + "]" * 200_000})),
        ("no splitfed header", lambda: save_tensors({"x": torch.zeros(1)})),
        ("truncated", lambda: good[: rng.randrange(1, len(good))]),
        ("random bytes", lambda: rng.randbytes(rng.randint(0, 2000))),
        ("header length beyond the payload", lambda: (10**12).to_bytes(8, "little") + good[8:]),
        ("tensor name very long", lambda: encode(Message(message.kind, message.sender, 1, 2,
                                                         {"n" * 1000: torch.zeros(1)}, message.values))),
    ]
    what, make = rng.choice(options)
    return f"{message.kind}: {what}", make()


MUTATIONS: tuple[Mutation, ...] = (_value_mutations, _tensor_mutations, _header_mutations)


def bad_payloads(kind: str, bounds: Bounds, rng: random.Random, sender: str = "device0") -> Iterator[tuple[str, bytes]]:
    """Endless (description, payload) pairs of ``kind``, each breaking one rule of the schema or header."""
    base = valid_message(kind, bounds, sender, batch=min(2, bounds.max_batch))
    while True:
        mutation = rng.choice(MUTATIONS)
        made = mutation(base, bounds, rng)
        if made is not None:
            yield made


def generate(count: int, bounds: Bounds, seed: int, sender: str = "device0", kinds: tuple[str, ...] = KINDS
             ) -> list[tuple[str, bytes]]:
    """``count`` bad payloads, cycling through ``kinds``."""
    rng = random.Random(seed)
    streams = {kind: bad_payloads(kind, bounds, rng, sender) for kind in kinds}
    return [next(streams[kinds[i % len(kinds)]]) for i in range(count)]

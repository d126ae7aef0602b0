"""One schema per message kind: what every value and tensor of a message may be.

``wire.messages.decode`` has already checked the header's structure. ``check`` then holds
a decoded (and unpacked: codecs removed) message to its kind's schema with the receiver's
``Bounds``, which come from the model, the config and the peer's own adapter layout:

- values: exactly the required ones plus allowed optional ones, each of its type, in its
  range (``num_samples >= 1``, ``0 <= scale <= 1``, finite numbers), from its choices;
- tensors: exactly the named ones, each of its dtype and shape (the batch axis is 1 ..
  ``train.batch_size`` and the same in every tensor; adapter tensors have the peer's
  exact shapes, so its rank), finite, integers within their range.

``check_reply`` adds what an answer to one request must be: its kind, round, step and the
sender the authenticated stream belongs to. Both ends check what they receive: the server
checks the devices' replies (``runtime.remote``), a device checks the server's requests
(``runtime.endpoint``). Every failure is a ``MessageError`` whose text names the field and
what is allowed, with the peer's own text escaped and cut short (``messages.shown``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from splitfed.wire.messages import MAX_HEADER_BYTES, MAX_INDEX, Message, MessageError, shown

BATCH = "batch"
"""A tensor axis of the message's batch size: 1 .. Bounds.max_batch (or exactly Bounds.batch), equal in all tensors."""
MAX_STATE_TENSORS = 100_000
STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
                torch.bool)
OPS = ("forward", "local_step", "upload", "export_state", "report", "stop", "measure_importance", "importance",
       "relayout", "forward_group")
"""Operations a ``call`` may ask of a device."""
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class Bounds:
    """What a receiver allows its peer to send: from the model, the config and the peer's adapter layout."""

    hidden_size: int
    vocab_size: int
    seq_len: int
    max_batch: int
    adapter: Mapping[str, tuple[int, ...]] | None = None
    """Exact names and shapes of the peer's adapter tensors (its rank included); None: not known yet."""
    max_samples: int = MAX_INDEX
    """Largest ``num_samples`` an upload may claim."""
    batch: int | None = None
    """The batch size the message must have (a device's pending forward); None: any up to max_batch."""
    merge_modules: Mapping[str, tuple[int, int]] | None = None
    """Modules whose base weights the receiver merges (``adapter_merge``): path -> (out, in) of the weight."""
    max_merge_rank: int = 0
    """Largest rank of one merge of one module (the sum of the ranks that were stacked)."""
    activation_dtype: torch.dtype = torch.float32
    """The dtype of activations and activation gradients (the run's ``compute.dtype``)."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int | str, ...]
    """Exact sizes; ``BATCH`` marks the batch axis."""
    dtype: torch.dtype
    finite: bool = False
    value_range: tuple[int, int] | None = None
    """For integer tensors: allowed [low, high) besides ``extra_values``."""
    extra_values: tuple[int, ...] = ()


@dataclass(frozen=True)
class ValueSpec:
    type: type
    """int, float (an int is accepted too) or str."""
    low: float = 0.0
    high: float = math.inf
    choices: tuple[str, ...] = ()
    max_chars: int = 256
    json_object: bool = False
    """A string that must hold a JSON object."""


@dataclass(frozen=True)
class Schema:
    tensors: Callable[[Bounds], dict[str, TensorSpec]] | None = None
    """The tensors a message of this kind carries; None: no tensors."""
    state_tensors: bool = False
    """Any number of named state tensors (``role_state``) instead of fixed ones."""
    score_tensors: bool = False
    """One non-negative float64 of shape (1,) per weight matrix of ``Bounds.merge_modules`` (the
    sender's target modules), named by its path (``importance``)."""
    merge_tensors: bool = False
    """Merge factors ``"<k>/<module>.lora_A.weight"`` / ``lora_B`` (``adapter_merge``), checked against
    ``Bounds.merge_modules`` and the message's ``since`` .. ``version``."""
    required: dict[str, ValueSpec] = field(default_factory=dict)
    optional: dict[str, ValueSpec] = field(default_factory=dict)


def _activations(b: Bounds) -> dict[str, TensorSpec]:
    return {
        "hidden": TensorSpec((BATCH, b.seq_len, b.hidden_size), b.activation_dtype, finite=True),
        "attention_mask": TensorSpec((BATCH, b.seq_len), torch.int64, value_range=(0, 2)),
        "labels": TensorSpec((BATCH, b.seq_len), torch.int64, value_range=(0, b.vocab_size), extra_values=(-100,)),
    }


def _activation_grad(b: Bounds) -> dict[str, TensorSpec]:
    return {"grad": TensorSpec((BATCH, b.seq_len, b.hidden_size), b.activation_dtype, finite=True)}


def _adapter(b: Bounds) -> dict[str, TensorSpec]:
    if b.adapter is None:
        raise MessageError("adapter tensors arrived before the adapter's layout is known")
    return {name: TensorSpec(tuple(shape), torch.float32, finite=True) for name, shape in b.adapter.items()}


FINITE = ValueSpec(float, low=-math.inf)
NON_NEGATIVE = ValueSpec(float)
COUNT = ValueSpec(int, high=MAX_INDEX)
JSON_OBJECT = ValueSpec(str, max_chars=MAX_HEADER_BYTES, json_object=True)

SCHEMAS: dict[str, Schema] = {
    # stage k -> stage k + 1: output of stage k plus what the last stage needs for the loss
    "activations": Schema(_activations),
    # stage k + 1 -> stage k: gradient of the group's mean loss w.r.t. the hidden states, the route's loss and
    # tokens, and grad_scale = group tokens / route tokens (the first stage multiplies by it)
    "activation_grad": Schema(_activation_grad, required={"loss": NON_NEGATIVE, "tokens": COUNT,
                                                          "grad_scale": NON_NEGATIVE}),
    # first stage -> server: its squared grad norm (for clipping over the whole route)
    "grad_norm": Schema(required={"sq_norm": NON_NEGATIVE}),
    # server -> every stage: factor to multiply the gradients by before the optimizer step (and the learning rate)
    "clip_scale": Schema(required={"scale": ValueSpec(float, high=1.0)}, optional={"lr": NON_NEGATIVE}),
    # a stage -> aggregator: local adapter after the round; a first stage adds its sample weight
    "adapter_upload": Schema(_adapter, optional={"num_samples": ValueSpec(int, low=1, high=MAX_INDEX)}),
    # aggregator -> device: global adapter slice for the next round
    "adapter_download": Schema(_adapter),
    # aggregator -> every role holding the layers: the merges since its last, to add to its base weights
    "adapter_merge": Schema(merge_tensors=True, required={"since": COUNT, "version": ValueSpec(int, low=1, high=MAX_INDEX)}),
    # a stage -> the aggregator: importance of each weight matrix it measured (HSplitLoRA), one float64 per path
    "importance": Schema(score_tensors=True),
    # server -> device process: run an operation that carries no data of its own; ``forward_group`` (an
    # edge's slot): forward the activations it holds for ``routes`` ({"<route>": batch}, in that order)
    "call": Schema(required={"op": ValueSpec(str, choices=OPS)},
                   optional={"lr": NON_NEGATIVE, "passes": COUNT, "placement": JSON_OBJECT, "routes": JSON_OBJECT}),
    # device process -> server: an operation finished (values may carry its result: an edge's backward
    # reports its squared grad norm and the encoded bytes of each route's gradient it holds for its user)
    "ack": Schema(optional={"loss": NON_NEGATIVE, "tokens": COUNT, "peak_bytes": ValueSpec(int, high=2**62),
                            "trainable_params": COUNT, "sq_norm": NON_NEGATIVE, "bytes": JSON_OBJECT}),
    # edge -> cloud, in place of a user's activations or gradient that the edge holds for the next stage
    # (it never crosses the backhaul); cloud -> edge: "send the user the gradient you hold". ``bytes``: the
    # encoded size on the user's hop, as the edge measured it
    "held": Schema(required={"batch": ValueSpec(int, low=1, high=MAX_INDEX)},
                   optional={"loss": NON_NEGATIVE, "tokens": COUNT, "grad_scale": NON_NEGATIVE, "bytes": COUNT}),
    # cloud -> edge: gradients of the outputs of a slot's routes, concatenated in the order of its forward,
    # with {"<route>": [batch, loss, tokens, grad_scale]}
    "group_grad": Schema(_activation_grad, required={"routes": JSON_OBJECT}),
    # either way: the message just received was refused, and why
    "error": Schema(required={"reason": ValueSpec(str, max_chars=MAX_REASON_CHARS)}),
    # device process <-> server: a role's adapter, optimizer and data-stream state (checkpoints)
    "role_state": Schema(state_tensors=True, required={"meta": ValueSpec(str, max_chars=MAX_HEADER_BYTES,
                                                                         json_object=True)}),
}


def check(message: Message, bounds: Bounds) -> Message:
    """``message`` if its values and tensors fit its kind's schema under ``bounds``; else MessageError."""
    schema = SCHEMAS[message.kind]
    where = f"{message.kind} message from {shown(message.sender, 40)}"
    _check_values(where, message.values, schema)
    if schema.state_tensors:
        _check_state_tensors(where, message.tensors)
        return message
    if schema.merge_tensors:
        _check_merge_tensors(where, message, bounds)
        return message
    if schema.score_tensors:
        _check_score_tensors(where, message.tensors, bounds)
        return message
    specs = schema.tensors(bounds) if schema.tensors else {}
    if message.tensors.keys() != specs.keys():
        extra = sorted(message.tensors.keys() - specs.keys())
        missing = sorted(specs.keys() - message.tensors.keys())
        raise MessageError(f"{where}: unexpected tensors {shown(extra)}, missing {shown(missing)}")
    batch: list[int] = [] if bounds.batch is None else [bounds.batch]
    for name, spec in specs.items():
        _check_tensor(where, name, message.tensors[name], spec, bounds, batch)
    return message


def check_reply(message: Message, bounds: Bounds, *, kind: str, round_index: int, step: int, sender: str) -> Message:
    """``message`` if it answers a request as expected (kind, round, step, sender) and fits its schema."""
    if message.kind == "error":
        raise MessageError(f"peer reported an error: {shown(message.values.get('reason'), 300)}")
    where = f"{message.kind} message from {shown(message.sender, 40)}"
    if message.sender != sender:
        raise MessageError(f"{where}: the sender must be {sender!r}, the identity of its stream")
    if message.kind != kind:
        raise MessageError(f"expected a {kind} message, got {where}")
    if (message.round, message.step) != (round_index, step):
        raise MessageError(f"{where}: round/step {message.round}/{message.step}, expected {round_index}/{step}")
    return check(message, bounds)


def _check_values(where: str, values: Mapping[str, object], schema: Schema) -> None:
    missing = schema.required.keys() - values.keys()
    if missing:
        raise MessageError(f"{where}: missing values {sorted(missing)}")
    allowed = {**schema.required, **schema.optional}
    unknown = values.keys() - allowed.keys()
    if unknown:
        raise MessageError(f"{where}: unexpected values {shown(sorted(unknown))}; allowed: {sorted(allowed) or 'none'}")
    for name, value in values.items():
        _check_value(where, name, value, allowed[name])


def _check_value(where: str, name: str, value: object, spec: ValueSpec) -> None:
    if spec.type is str:
        if not isinstance(value, str) or len(value) > spec.max_chars:
            raise MessageError(f"{where}: value {name}={shown(value)} is not a string of at most {spec.max_chars} chars")
        if spec.choices and value not in spec.choices:
            raise MessageError(f"{where}: value {name}={shown(value)}; allowed: {', '.join(spec.choices)}")
        if spec.json_object:
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError) as error:
                raise MessageError(f"{where}: value {name} is not JSON: {shown(str(error))}") from None
            if not isinstance(parsed, dict):
                raise MessageError(f"{where}: value {name} is JSON {type(parsed).__name__}, not an object")
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.type is int and not (number and isinstance(value, int)):
        raise MessageError(f"{where}: value {name}={shown(value)} is not an integer")
    if not number or not math.isfinite(value) or not spec.low <= value <= spec.high:
        raise MessageError(f"{where}: value {name}={shown(value)} is not a finite number in [{spec.low:g}, {spec.high:g}]")


def _check_tensor(where: str, name: str, tensor: torch.Tensor, spec: TensorSpec, bounds: Bounds,
                  batch: list[int]) -> None:
    if tensor.dtype != spec.dtype:
        raise MessageError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, expected {spec.dtype}")
    shown_shape = tuple(f"1..{bounds.max_batch}" if s == BATCH else s for s in spec.shape)
    if tensor.dim() != len(spec.shape):
        raise MessageError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shown_shape}")
    for got, want in zip(tensor.shape, spec.shape):
        if want == BATCH:
            if not 1 <= got <= bounds.max_batch or (batch and got != batch[0]):
                expected = batch[0] if batch else f"1..{bounds.max_batch}"
                raise MessageError(f"{where}: tensor {name!r} has batch size {got}, expected {expected}")
            batch[:] = [got]
        elif got != want:
            raise MessageError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shown_shape}")
    if spec.finite and not bool(torch.isfinite(tensor).all()):
        raise MessageError(f"{where}: tensor {name!r} has NaN or infinite values")
    if spec.value_range is not None:
        low, high = spec.value_range
        bad = (tensor < low) | (tensor >= high)
        for allowed in spec.extra_values:
            bad &= tensor != allowed
        if bool(bad.any()):
            extra = f" or {list(spec.extra_values)}" if spec.extra_values else ""
            raise MessageError(f"{where}: tensor {name!r} has values outside [{low}, {high}){extra}")


def _check_state_tensors(where: str, tensors: Mapping[str, torch.Tensor]) -> None:
    if len(tensors) > MAX_STATE_TENSORS:
        raise MessageError(f"{where}: {len(tensors)} state tensors; at most {MAX_STATE_TENSORS} allowed")
    for name, tensor in tensors.items():
        if tensor.dtype not in STATE_DTYPES:
            raise MessageError(f"{where}: state tensor {shown(name)} has dtype {tensor.dtype}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MessageError(f"{where}: state tensor {shown(name)} has NaN or infinite values")


_MERGE_NAME = re.compile(r"(\d{1,10})/(.+)\.lora_([AB])\.weight")


def _check_merge_tensors(where: str, message: Message, bounds: Bounds) -> None:
    """Each name a merge version in [since, version) of a module the receiver holds; A (R, in) and
    B (out, R) of one merge of one module both present with one R <= max_merge_rank; finite float32."""
    since, version = int(message.values["since"]), int(message.values["version"])
    if since >= version:
        raise MessageError(f"{where}: since={since} must be below version={version}")
    if bounds.merge_modules is None:
        raise MessageError(f"{where}: this receiver holds no layers to merge into")
    if len(message.tensors) > MAX_STATE_TENSORS:
        raise MessageError(f"{where}: {len(message.tensors)} tensors; at most {MAX_STATE_TENSORS} allowed")
    ranks: dict[tuple[str, str], dict[str, int]] = {}
    for name, tensor in message.tensors.items():
        match = _MERGE_NAME.fullmatch(name)
        if match is None:
            raise MessageError(f"{where}: tensor {shown(name)} is not named '<version>/<module>.lora_A.weight' (or lora_B)")
        k, module, factor = match.groups()
        if not since <= int(k) < version:
            raise MessageError(f"{where}: tensor {shown(name)} is merge {k}; the message brings {since}..{version - 1}")
        if module not in bounds.merge_modules:
            raise MessageError(f"{where}: tensor {shown(name)}: {shown(module)} is not a module of the receiver's layers")
        out_features, in_features = bounds.merge_modules[module]
        if tensor.dtype != torch.float32 or tensor.dim() != 2:
            raise MessageError(f"{where}: tensor {shown(name)} must be a 2-D float32 tensor; got {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        rank, other, want = (tensor.shape[0], tensor.shape[1], in_features) if factor == "A" else \
            (tensor.shape[1], tensor.shape[0], out_features)
        if other != want or not 1 <= rank <= bounds.max_merge_rank:
            expected = f"(R, {in_features})" if factor == "A" else f"({out_features}, R)"
            raise MessageError(f"{where}: tensor {shown(name)} has shape {tuple(tensor.shape)}, expected {expected} "
                               f"with 1 <= R <= {bounds.max_merge_rank}")
        if not bool(torch.isfinite(tensor).all()):
            raise MessageError(f"{where}: tensor {shown(name)} has NaN or infinite values")
        ranks.setdefault((k, module), {})[factor] = rank
    for (k, module), factors in ranks.items():
        if len(set(factors.values())) != 1 or len(factors) != 2:
            raise MessageError(f"{where}: merge {k} of {shown(module)} needs lora_A and lora_B of one rank; got {factors}")


def _check_score_tensors(where: str, tensors: Mapping[str, torch.Tensor], bounds: Bounds) -> None:
    known = bounds.merge_modules or {}
    missing = sorted(known.keys() - tensors.keys())
    if missing:
        raise MessageError(f"{where}: no score for {shown(missing[:3])} ({len(missing)} weight matrices of the sender's "
                           "layers unscored)")
    for name, tensor in tensors.items():
        if name not in known:
            raise MessageError(f"{where}: tensor {shown(name)} is not a weight matrix of the sender's layers")
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != (1,):
            raise MessageError(f"{where}: tensor {shown(name)} must be float64 of shape (1,); got {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()) or float(tensor[0]) < 0:
            raise MessageError(f"{where}: tensor {shown(name)} must be a finite score >= 0")

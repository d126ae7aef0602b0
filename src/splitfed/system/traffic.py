"""Predicted encoded bytes of every message of a split round, without running the model.

The roles' messages are rebuilt with tensors of the real names, shapes and dtypes and encoded
with the wire format, so uncompressed sizes are exact to a few bytes (the scalar values'
digits vary). A compressed tensor is priced one of two ways:

* ``exact=False`` (the planners' search): ``splitfed.wire.codecs.bytes_per_element`` on the
  pipeline spec, no encoding at all;
* ``exact=True`` (the clock, and so plan predictions): a seeded Gaussian tensor of the real
  shape is packed by the wire's own ``MessageCodec`` and encoded, so codec metadata and
  headers are the real ones; only zstd's gain on real data (vs Gaussian) can differ.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from splitfed.config import CompressionSection
from splitfed.system.costs import LayerCosts
from splitfed.wire.codecs import bytes_per_element
from splitfed.wire.compression import ROUTES, MessageCodec, routed
from splitfed.wire.messages import Message, encode

# Typical scalar values: as long as real ones when printed (17 significant digits).
_FLOAT = 0.12345678901234568


def _sample(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _message_bytes(message: Message, spec: str, exact: bool) -> int:
    """Encoded bytes of ``message`` with its routed tensors (hidden, grad, adapter tensors) coded by ``spec``."""
    if spec.strip() in ("", "none"):
        return len(encode(message))
    if exact:
        codec = MessageCodec(CompressionSection(**{ROUTES[message.kind][0]: spec}), seed=0)
        direction = "up" if message.kind in ("activations", "adapter_upload") else "down"
        return len(encode(codec.pack(direction, 0, message)))
    names = routed(message)
    plain = {n: t for n, t in message.tensors.items() if n not in names}
    size = len(encode(Message(message.kind, message.sender, message.round, message.step, plain, message.values)))
    for name in names:
        tensor = message.tensors[name]
        size += round(bytes_per_element(spec, tensor.numel(), tensor.shape[-1]) * tensor.numel())
    return size


@lru_cache(maxsize=512)
def _step_bytes(hidden: int, batch: int, seq: int, sender: str, activations: str, gradients: str,
                exact: bool) -> tuple[int, int, int, int]:
    tokens = {name: torch.zeros(batch, seq, dtype=torch.long) for name in ("attention_mask", "labels")}
    up = Message("activations", sender, 0, 0, {"hidden": _sample(batch, seq, hidden), **tokens})
    grad_values = {"loss": _FLOAT, "tokens": batch * (seq - 1), "grad_scale": _FLOAT}
    down = Message("activation_grad", "server", 0, 0, {"grad": _sample(batch, seq, hidden)}, grad_values)
    return (
        _message_bytes(up, activations, exact),
        _message_bytes(down, gradients, exact),
        len(encode(Message("grad_norm", sender, 0, 0, values={"sq_norm": _FLOAT}))),
        len(encode(Message("clip_scale", "server", 0, 0, values={"scale": _FLOAT}))),
    )


def step_bytes(costs: LayerCosts, device: int, batch: int, seq: int, activations: str = "none",
               gradients: str = "none", exact: bool = False) -> dict[str, int]:
    """Bytes of each message kind of one split step of ``device``: activations (up), activation_grad
    (down), grad_norm (up), clip_scale (down); ``activations`` / ``gradients``: their pipeline specs."""
    sender = "device" + "0" * len(str(device))  # same length as the real name: the same bytes
    sizes = _step_bytes(costs.hidden, batch, seq, sender, activations, gradients, exact)
    return dict(zip(("activations", "activation_grad", "grad_norm", "clip_scale"), sizes))


def adapter_message_bytes(costs: LayerCosts, layers: range, rank: int, spec: str = "none", upload: bool = True,
                          device: int = 0, exact: bool = False) -> int:
    """Bytes of an adapter upload (device -> aggregator) or download (aggregator -> device) carrying
    the LoRA tensors of ``layers`` at ``rank``; ``spec``: the adapters' pipeline."""
    return _adapter_bytes(costs, layers.start, layers.stop, rank, spec, upload, len(str(device)), exact)


@lru_cache(maxsize=4096)
def _adapter_bytes(costs: LayerCosts, start: int, stop: int, rank: int, spec: str, upload: bool, digits: int,
                   exact: bool) -> int:
    make = torch.zeros if spec.strip() in ("", "none") else _sample  # plain sizes do not depend on values
    tensors = {}
    for layer in range(start, stop):
        for linear in costs.linears:
            if linear.lora:
                prefix = f"{costs.layers_path}.{layer}.{linear.path}"
                tensors[f"{prefix}.lora_A.weight"] = make(rank, linear.in_features)
                tensors[f"{prefix}.lora_B.weight"] = make(linear.out_features, rank)
    if upload:
        message = Message("adapter_upload", "device" + "0" * digits, 0, 0, tensors, {"num_samples": 1000})
    else:
        message = Message("adapter_download", "aggregator", 0, 0, tensors)
    return _message_bytes(message, spec, exact)

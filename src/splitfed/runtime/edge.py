"""An edge server's side of a three-tier run: its middle stage, and the relay to its users.

The edge process holds a stage worker for its layers (one slot per user cut it serves) and
is reached by the cloud on one stream per slot (``topology.edge_peers``) and one stream per
connected user, which it relays to that user. What crosses the user's hop stays at the edge:

- the cloud asks a user to ``forward``: the edge relays the call, keeps the activations the
  user sends back (unpacked by the user's codec, checked against their schema) and answers
  the cloud with a ``held`` receipt (batch, bytes on the user's hop);
- the cloud's ``forward_group`` on a slot stream forwards what the edge holds for the named
  routes and returns the slot's output activations (these cross the backhaul);
- the cloud's ``group_grad`` backpropagates through the slot; the edge keeps each route's input
  gradient, packed by the user's codec, and acks with its squared grad norm and their sizes;
- the cloud's ``held`` request on a user's stream sends the user the gradient the edge holds.

Everything else the cloud sends a user (downloads, merges, clipping factors, state) passes
unchanged, and so do the user's replies: the cloud checks them as it checks any device's.
Transport-agnostic: ``relay`` takes a function that sends one request to the user and waits.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from splitfed.roles.worker import StageWorker
from splitfed.runtime.endpoint import HostedDevice
from splitfed.wire.compression import MessageCodec
from splitfed.wire.messages import Message, MessageError, encode, shown
from splitfed.wire.schema import Bounds, check

UserRequest = Callable[[Message], tuple[Message, int, int]]
"""Send one request to a user and wait: (reply, bytes sent, bytes received); raises if the user is lost."""


@dataclass
class EdgeServer:
    """Edge ``index``: its worker, a stream endpoint per slot, and what it holds for its users' routes."""

    index: int
    worker: StageWorker
    codec: MessageCodec
    user_bounds: Bounds
    """What a user's activations may be (the run's model and batch size)."""
    slot_routes: dict[str, set[int]]
    """The routes (users) each slot serves."""
    slots: dict[str, HostedDevice] = field(default_factory=dict)
    """One endpoint per slot stream (``build_slots``)."""
    _activations: dict[int, Message] = field(default_factory=dict)
    _gradients: dict[int, Message] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    compute: threading.Lock = field(default_factory=threading.Lock)
    """The slots share one model: their streams' requests take turns."""

    @property
    def name(self) -> str:
        return self.worker.name

    def build_slots(self, peers: dict[str, int], bounds: dict[str, Bounds], servers: frozenset[str]) -> None:
        """An endpoint for each slot's stream (``peers``: slot -> its stream id at the cloud; ``bounds``: what
        the cloud may send that slot)."""
        for slot, peer in peers.items():
            routes = self.slot_routes[slot]
            slot_bounds = replace(bounds[slot], max_batch=bounds[slot].max_batch * len(routes))
            endpoint = HostedDevice(peer, self.worker, slot_bounds, servers, slot=slot, guard=self.compute,
                                    coded=False)
            endpoint.operations = {"forward_group": lambda m, s=slot: self.forward_group(s, m),
                                   "backward_group": lambda m, s=slot: self.backward_group(s, m)}
            self.slots[slot] = endpoint

    # --- the slot streams -------------------------------------------------------------------
    def forward_group(self, slot: str, message: Message) -> Message:
        """Forward the activations held for the call's routes through ``slot``; return its outputs, concatenated."""
        sizes = _routes(message, self.slot_routes[slot], 1)
        with self._lock:
            missing = [u for u in sizes if u not in self._activations]
            if missing:
                raise MessageError(f"forward_group: no activations held for routes {missing}")
            held = {u: self._activations.pop(u) for u in sizes}
        wrong = {u: int(m.tensors["hidden"].shape[0]) for u, m in held.items() if m.tensors["hidden"].shape[0] != sizes[u][0]}
        if wrong:
            raise MessageError(f"forward_group: batch sizes {shown(sizes)} do not match the held activations {wrong}")
        outputs = self.worker.forward_group({slot: list(held.items())})
        tensors = {k: torch.cat([outputs[u].tensors[k] for u in sizes]) for k in ("hidden", "attention_mask", "labels")}
        return Message("activations", self.name, message.round, message.step, tensors)

    def backward_group(self, slot: str, message: Message) -> Message:
        """Backpropagate the gradients of the slot's outputs; keep each route's input gradient for its user."""
        pending = self.worker.slot(slot).pending
        routes = _routes(message, set(pending.routes), 4)
        if list(routes) != pending.routes or [v[0] for v in routes.values()] != pending.sizes:
            raise MessageError(f"group_grad: routes {shown(message.values['routes'])} are not the pending forward's "
                               f"{dict(zip(pending.routes, pending.sizes))}")
        grads = message.tensors["grad"].split(pending.sizes)
        arrivals = []
        for (u, (_, loss, tokens, grad_scale)), grad in zip(routes.items(), grads):
            values = {"loss": float(loss), "tokens": int(tokens), "grad_scale": float(grad_scale)}
            arrivals.append((u, check(Message("activation_grad", message.sender, message.round, message.step,
                                              {"grad": grad}, values), self.user_bounds)))
        inputs = self.worker.backward_group({slot: arrivals})
        sizes = {}
        with self._lock:
            for u, grad in inputs.items():
                packed = self.codec.pack("down", u, grad)
                self._gradients[u] = packed
                sizes[str(u)] = len(encode(packed))
        return Message("ack", self.name, message.round, message.step,
                       values={"sq_norm": self.worker.sq_norm(slot), "bytes": json.dumps(sizes)})

    # --- the users' streams -----------------------------------------------------------------
    def relay(self, user: int, message: Message, send: UserRequest) -> Message:
        """The answer to the cloud's request ``message`` for ``user``: relayed, or kept here (see module doc)."""
        if message.kind == "held":  # send the user the gradient held for it
            with self._lock:
                gradient = self._gradients.pop(user, None)
            if gradient is None:
                raise MessageError(f"no gradient held for user {user}")
            reply, _, _ = send(gradient)
            return reply
        reply, _, received = send(message)
        if not (message.kind == "call" and message.values.get("op") == "forward" and reply.kind == "activations"):
            return reply
        activations = check(self.codec.unpack(user, reply), self.user_bounds)
        with self._lock:
            self._activations[user] = activations
        batch = int(activations.tensors["hidden"].shape[0])
        return Message("held", reply.sender, reply.round, reply.step, values={"batch": batch, "bytes": received})

    def forget(self, user: int) -> None:
        """Drop what is held for a user that left."""
        with self._lock:
            self._activations.pop(user, None)
            self._gradients.pop(user, None)


def _routes(message: Message, allowed: set[int], width: int) -> dict[int, list]:
    """The message's ``routes`` value ({"<route>": batch} or {"<route>": [batch, loss, tokens, grad_scale]})
    as {route: [fields]}, every route one of ``allowed``; else MessageError."""
    try:
        raw = json.loads(str(message.values["routes"]))
    except (KeyError, ValueError):
        raise MessageError(f"{message.kind}: routes must be a JSON object") from None
    routes: dict[int, list] = {}
    for key, value in raw.items():
        fields = value if isinstance(value, list) else [value]
        if not key.isdigit() or int(key) not in allowed:
            raise MessageError(f"{message.kind}: route {shown(key)} is not one this slot serves ({sorted(allowed)})")
        if len(fields) != width or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fields) \
                or not isinstance(fields[0], int) or fields[0] < 1:
            raise MessageError(f"{message.kind}: route {key}: {shown(value)} is not {width} number(s) led by a batch size")
        routes[int(key)] = fields
    if not routes:
        raise MessageError(f"{message.kind}: no routes")
    return routes

"""Round logic of every split protocol: routes of two or more stages, whatever the topology.

Per local step:
  1. every active device's first stage starts its forward pass (all requests sent, then waited on);
  2. for each group of routes the server side serves together, in serving order: the group's
     activations travel up the route, stage by stage (slots of one worker process their
     routes as one concatenated batch; the last stage computes the loss and its backward),
     gradients travel back down, and each device backpropagates (again: all sent, then waited);
  3. clipping uses the norm over every stage of a route: the slots a group's routes share
     form one clipping set, whose LoRA (server side and devices) steps with one factor.
A group's clipping waits (so the next group's server work overlaps its devices' backward)
unless the next group trains one of its server-side slots. At round end every slot uploads
its adapter, each route's slots form a full-depth adapter, and the aggregator combines them
layer by layer into the global adapter that every slot loads next round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from splitfed.optim import clip_scale
from splitfed.protocols.base import Protocol
from splitfed.runtime.futures import Reply
from splitfed.runtime.remote import DeviceDropped
from splitfed.topology import NO_ROUTE, StagePlacement, groups_share_slots
from splitfed.wire.messages import Message


class _Group:
    """A served group whose clipping and optimizer steps are still to come."""

    def __init__(self, routes: list[int], norms: dict[int, Reply[Message]], served: list[StagePlacement]) -> None:
        self.routes = routes
        self.norms = norms
        self.served = served
        """Server-side slots that ran a forward pass for this group."""

    def shares_slot_with(self, routes: list[int], protocol: Protocol) -> bool:
        keys = {s.key for s in self.served}
        return any(s.key in keys for u in routes for s in protocol.topo.routes[u].stages[1:])


class SplitProtocol(Protocol):
    def train_round(self, round_index: int, participants: list[int]) -> None:
        clock = self.clock
        clock.begin_round(round_index, participants)
        active = list(participants)  # devices still in the round (remote ones may drop)
        self.download_adapters(round_index, participants, active)
        clock.transfer(self.take_sent())
        self.link.clear_pending()  # adapter downloads are counted per round, not per step
        for step in range(self.config.train.local_steps):
            started, lr = time.perf_counter(), self.current_lr()
            groups = type(self).groups(self.config, clock, list(active), self.step_index)
            forwards = {u: self._first_forward(u, round_index, step) for u in active}
            self._losses: dict[int, tuple[float, int]] = {}
            pending: list[_Group] = []
            for group in groups:
                waiting = [g for g in pending if g.shares_slot_with(group, self)]
                for done in waiting:
                    self._clip_and_step(done, round_index, step, lr, active)
                pending = [g for g in pending if g not in waiting]
                pending.append(self._serve(group, forwards, round_index, step, active))
            for done in pending:
                self._clip_and_step(done, round_index, step, lr, active)
            finished = clock.split_step(groups, self.take_sent(), groups_share_slots(self.topo.server_side_slots(), groups))
            for u in active:
                self.log_step(round_index, step, u, *self._losses[u], started, finished[u])
            self.step_index += 1

        uploads = self.upload_adapters(round_index, active)
        clock.transfer(self.take_sent())
        self.require_quorum(round_index, participants, active)
        self.aggregate(uploads)

    # --- one step -------------------------------------------------------------------------
    def _first_forward(self, device: int, round_index: int, step: int) -> Reply[Message]:
        handle, stage = self.first(device)
        return handle.forward(stage.slot, round_index, step)

    def _serve(self, group: list[int], forwards: dict[int, Reply[Message]], round_index: int, step: int,
               active: list[int]) -> _Group:
        """Activations of ``group`` up the server-side stages and gradients back to its devices."""
        arrivals: dict[int, Message] = {}
        for u in group:
            message = self.attempt(u, round_index, step, active, forwards[u].result)
            if message is not None:
                arrivals[u] = self.net.carry(self.topo.routes[u].hops[0], u, "up", message)
        if not arrivals:
            return _Group([], {}, [])
        served = self._slots_of(list(arrivals))
        served = [s for s in served if not s.first]
        grads = self._server_side(arrivals, round_index, step, active)
        norms = {}
        for u, grad in grads.items():
            handle, stage = self.first(u)
            delivered = self.net.carry(self.topo.routes[u].hops[0].reverse(), u, "down", grad)
            norms[u] = handle.backward(stage.slot, delivered)
        self._losses.update({u: (float(g.values["loss"]), int(g.values["tokens"])) for u, g in grads.items()})
        return _Group(list(grads), norms, served)

    def _server_side(self, arrivals: dict[int, Message], round_index: int, step: int,
                     active: list[int]) -> dict[int, Message]:
        """Forward through stages 1..K-1 (the last computes loss and backward), then backward through
        the middle stages; returns each route's gradient for its first stage's output (routes through
        a remote stage that was lost on the way have none: they left the round)."""
        routes = self.topo.routes
        depth = len(routes[next(iter(arrivals))].stages)
        if any(len(routes[u].stages) != depth for u in arrivals):
            raise ValueError("routes served in one group must have the same number of stages")
        current = arrivals
        dropped = lambda u, reason: self.drop(u, round_index, step, active, reason)  # noqa: E731
        for k in range(1, depth):
            replies = self._each_worker(current, k, "forward_group", dropped)
            if k == depth - 1:
                current = replies
                break
            current = {u: self.net.carry(routes[u].hops[k], u, "up", m) for u, m in replies.items()}
        for k in range(depth - 2, 0, -1):
            delivered = {u: self.net.carry(routes[u].hops[k].reverse(), u, "down", m) for u, m in current.items()}
            current = self._each_worker(delivered, k, "backward_group", dropped)
        return current

    def _each_worker(self, messages: dict[int, Message], k: int, op: str,
                     dropped: Callable[[int, str], None]) -> dict[int, Message]:
        """Send the messages at stage ``k`` to their workers (each gets its slots' arrivals at
        once; different workers run at the same time), then collect the replies. A remote worker
        that is lost takes its routes out of the round (``dropped(route, reason)``)."""
        by_worker: dict[str, dict[str, list[tuple[int, Message]]]] = {}
        for u, message in messages.items():
            stage = self.topo.routes[u].stages[k]
            by_worker.setdefault(stage.worker, {}).setdefault(stage.slot, []).append((u, message))
        requests = {w: getattr(self.workers[w], op)(groups) for w, groups in by_worker.items()}
        replies: dict[int, Message] = {}
        for w, reply in requests.items():
            try:
                replies.update(reply.result())
            except DeviceDropped as error:
                for arrivals in by_worker[w].values():
                    for u, _ in arrivals:
                        dropped(u, error.reason)
        return replies

    def _clip_and_step(self, group: _Group, round_index: int, step: int, lr: float, active: list[int]) -> None:
        """Clip on the norm over every stage of the routes that share slots, then step them all."""
        device_sq: dict[int, float] = {}
        for u in group.routes:
            reply = self.attempt(u, round_index, step, active, group.norms[u].result)
            if reply is not None:
                reply = self.net.carry(self.topo.routes[u].hops[0], u, "up", reply)
                device_sq[u] = float(reply.values["sq_norm"])
        max_norm = self.config.train.max_grad_norm
        stepped: set[tuple[str, str]] = set()
        acks = []
        server_steps = []
        for routes, slots in self._clipping_sets(list(device_sq), group.served):
            total_sq = sum(self.workers[s.worker].sq_norm(s.slot) for s in slots)
            total_sq += sum(device_sq[u] for u in routes)
            scale = clip_scale(total_sq, max_norm)
            for u in routes:  # the devices' steps first: they run elsewhere while the server steps
                handle, stage = self.first(u)
                message = Message("clip_scale", self.topo.routes[u].stages[1].worker, round_index, step,
                                  values={"scale": scale})
                delivered = self.net.carry(self.topo.routes[u].hops[0].reverse(), u, "down", message)
                acks.append((u, handle.apply(stage.slot, delivered, lr)))
            server_steps += [(s, scale) for s in slots]
        applied = [(s, self.workers[s.worker].apply(s.slot, Message("clip_scale", self.topo.aggregator, round_index, step,
                                                                     values={"scale": scale}), lr))
                   for s, scale in server_steps]  # remote stages (edges) step at the same time
        for s, reply in applied:
            self.attempt(NO_ROUTE, round_index, step, active, reply.result,
                         routes=[u for u in group.routes if u in active and s.key in self._keys(u)])
            stepped.add(s.key)
        for s in group.served:  # every route of the slot dropped out after its forward: no step
            if s.key not in stepped:
                self.workers[s.worker].discard(s.slot)
        for u, ack in acks:
            self.attempt(u, round_index, step, active, ack.result)

    def _keys(self, route: int) -> set[tuple[str, str]]:
        return {s.key for s in self.topo.routes[route].stages}

    def _clipping_sets(self, routes: list[int], served: list[StagePlacement]) -> list[tuple[list[int], list[StagePlacement]]]:
        """Routes joined by the server-side slots they share (union-find), with those slots."""
        served_keys = {s.key: s for s in served}
        parent: dict[object, object] = {}

        def find(x: object) -> object:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        for u in routes:
            for s in self.topo.routes[u].stages[1:]:
                if s.key in served_keys:
                    parent[find(("route", u))] = find(s.key)
        sets: dict[object, tuple[list[int], list[StagePlacement]]] = {}
        for u in routes:
            sets.setdefault(find(("route", u)), ([], []))[0].append(u)
        for key, stage in served_keys.items():
            root = find(key)
            if root in sets:
                sets[root][1].append(stage)
        return list(sets.values())

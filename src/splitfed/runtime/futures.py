"""Replies that may not have arrived yet: protocols send to every member of a group, then wait.

In-process a request runs when it is made, so results come in a fixed order and a run is
deterministic; a remote request runs on another machine while the protocol goes on, and
``result`` waits for it. Both runtimes resolve the protocol's requests in the same order (the
gRPC and Ray tests match the in-process adapters to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
_UNSET = object()


class Reply(Generic[T]):
    """The answer to one request; ``result()`` waits for it and raises what the request raised."""

    def __init__(self, wait: Callable[[], T]) -> None:
        self._wait = wait
        self._value: object = _UNSET
        self._error: BaseException | None = None

    def result(self) -> T:
        if self._value is _UNSET and self._error is None:
            try:
                self._value = self._wait()
            except BaseException as error:
                self._error = error
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def run_now(action: Callable[[], T]) -> Reply[T]:
    """Run ``action`` at once (in-process); its value or error is kept for ``result()``."""
    reply: Reply[T] = Reply(action)
    try:
        reply.result()
    except Exception:  # kept; raised again when the protocol asks for the result
        pass
    return reply


def run_later(pool: ThreadPoolExecutor, request: Callable[[], object], finish: Callable[[object], T]) -> Reply[T]:
    """Start ``request`` on ``pool`` now; ``result()`` waits for it, then runs ``finish`` on the
    caller's thread (so checks, codecs and byte counters never run concurrently)."""
    pending = pool.submit(request)
    return Reply(lambda: finish(pending.result()))

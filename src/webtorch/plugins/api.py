"""The phases a plugin may join, which of them may be ``async``, and :func:`every`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

# In the order a request meets them (connect once per connection; pick once per attempt of a
# proxied request; log always, last).
PHASES: Final = (
    "startup",
    "shutdown",
    "connect",
    "disconnect",
    "request",
    "request_body",
    "pick",
    "response",
    "response_body",
    "log",
)
# Phases that may wait (``async def``): the request's own, before anything is sent back, and
# those off the request path. The rest run inside the server's callbacks: plain functions.
ASYNC_PHASES: Final = frozenset({"startup", "shutdown", "request", "request_body"})
# Phases run per request (their calls, errors and time are counted per plugin): all but the
# server's own start and stop.
REQUEST_PHASES: Final = tuple(p for p in PHASES if p not in ("startup", "shutdown"))
# The attribute :func:`every` marks a method with.
EVERY_ATTRIBUTE: Final = "__webtorch_every__"
# Shortest period of periodic work: a plugin cannot busy the loop with timers.
MIN_PERIOD: Final = 0.01

F = TypeVar("F", bound=Callable[..., object])


def every(seconds: float) -> Callable[[F], F]:
    """Mark a plugin method as periodic work, run every ``seconds`` on the event loop (plain or
    ``async``), from startup to shutdown; its failures are logged and counted like a phase's."""
    if not seconds >= MIN_PERIOD:
        raise ValueError(f"every({seconds!r}): the period is at least {MIN_PERIOD} seconds")

    def mark(fn: F) -> F:
        setattr(fn, EVERY_ATTRIBUTE, float(seconds))
        return fn

    return mark

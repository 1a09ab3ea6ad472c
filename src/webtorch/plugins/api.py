"""The phases a plugin may join, which of them may be ``async``, :func:`every` and
:class:`Later`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from webtorch.http.messages import Response

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


class Later:
    """What a plain ``request`` phase returns to decide after it returned, without a task:
    :meth:`go_on` lets the request on to the next plugin (and the route), :meth:`respond`
    answers it instead. For work that settles many requests at once from a callback (the guard
    scores the requests of one loop turn in one pass): an ``async`` phase costs a task per
    request, this costs one object. Settle it on the event loop's thread, once (later calls are
    ignored). If the client goes away first, :attr:`on_cancel` is called (the work may stop);
    settling it then changes nothing."""

    __slots__ = ("_arg", "_callback", "answer", "on_cancel", "settled")

    def __init__(self) -> None:
        self.settled = False
        self.answer: Response | None = None
        self.on_cancel: Callable[[], None] | None = None
        self._callback: Callable[[Any, Response | None], None] | None = None
        self._arg: Any = None

    def go_on(self) -> None:
        self._settle(None)

    def respond(self, response: Response) -> None:
        self._settle(response)

    def cancel(self) -> None:
        """The runner's: the request is gone."""
        if not self.settled:
            self.settled = True
            self._callback = self._arg = None
            on_cancel, self.on_cancel = self.on_cancel, None
            if on_cancel is not None:
                on_cancel()

    def subscribe(self, callback: Callable[[Any, Response | None], None], arg: Any) -> None:
        """The runner's: ``callback(arg, answer)`` once settled (at once if it is)."""
        if self.settled:
            callback(arg, self.answer)
        else:
            self._callback, self._arg = callback, arg

    def _settle(self, answer: Response | None) -> None:
        if self.settled:
            return
        self.settled = True
        self.answer = answer
        self.on_cancel = None
        callback, arg = self._callback, self._arg
        self._callback = self._arg = None
        if callback is not None:
            callback(arg, answer)

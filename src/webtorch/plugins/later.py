""":class:`Later`: a ``request`` phase's decision made after it returned, without a task.

Compiled (compiled.py): the guard returns one per request it scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webtorch.http.messages import Response


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

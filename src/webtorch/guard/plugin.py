"""The guard as a plugin (docs/PLUGINS.md, "The guard on this API"): app.py puts it first in the
running set when ``[guard]`` is configured, named ``guard``, with ``body = "stream"``.

Its phases are :class:`GuardShell`'s methods (``shell.py``: connect, disconnect, request,
request_body, log), bound to the plugin object so that the runner calls them with nothing in
between; its periodic work is an :func:`every` method here (a compiled class's methods take no
marks). Built from the config by ``build.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from webtorch.guard.core import Guard
from webtorch.guard.shell import GuardShell
from webtorch.http.messages import Request
from webtorch.plugins.api import every

if TYPE_CHECKING:
    from webtorch.guard.feedback import Feedback  # torch: only with online adaptation on


class GuardPlugin:
    """The guard's phases, and its table's expiry every second."""

    def __init__(
        self,
        guard: Guard,
        client_key: str = "ip",
        clock: Callable[[], float] = time.monotonic,
        feedback: Feedback | None = None,
        trusted: Callable[[Request], bool] | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        shell = GuardShell(guard, client_key, clock, feedback, trusted, trusted_proxies)
        self.shell = shell
        self.guard = guard
        self.clock = clock
        self.connect = shell.connect
        self.disconnect = shell.disconnect
        self.request = shell.request
        self.request_body = shell.request_body
        self.log = shell.log

    @every(1.0)
    def expire(self) -> None:
        """Idle clients leave the table; bans and surges end on time."""
        self.guard.expire(self.clock())

"""The guard as a plugin (docs/PLUGINS.md, "The guard on this API"): app.py puts it first in the
running set when ``[guard]`` is configured, named ``guard``, with ``body = "stream"``.

Its phases are :class:`GuardShell`'s methods (``shell.py``: connect, disconnect, request,
request_body, log), bound to the plugin object so that the runner calls them with nothing in
between; its periodic work is an :func:`every` method here (a compiled class's methods take no
marks). app.py builds the shell from the config (``build.py`` makes its Guard).
"""

from __future__ import annotations

from webtorch.guard.shell import GuardShell
from webtorch.plugins.api import every


class GuardPlugin:
    """The guard's phases, and its table's expiry every second."""

    def __init__(self, shell: GuardShell) -> None:
        self.shell = shell
        self.connect = shell.connect
        self.disconnect = shell.disconnect
        self.request = shell.request
        self.request_body = shell.request_body
        self.log = shell.log

    @every(1.0)
    def expire(self) -> None:
        """Idle clients leave the table; bans and surges end on time."""
        self.shell.guard.expire(self.shell.clock())

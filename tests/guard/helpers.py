"""The guard as the server runs it, for tests without sockets: its plugin (guard/plugin.py),
the first of a running set, through the plugins' runner around a handler."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from webtorch.guard.core import Guard
from webtorch.guard.plugin import GuardPlugin
from webtorch.guard.shell import GuardShell
from webtorch.http.messages import Handler, HandlerResult, Request
from webtorch.plugins.host import PluginHost


class Guarded:
    """``handler`` behind ``guard``: call it as the server calls its handler."""

    def __init__(
        self,
        guard: Guard,
        handler: Handler,
        client_key: str = "ip",
        clock: Callable[[], float] = time.monotonic,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        shell = GuardShell(guard, client_key, clock=clock, trusted_proxies=trusted_proxies)
        self.plugin = GuardPlugin(shell)
        self.host = PluginHost([], Path("."), _no_models)
        self.host.put_first("guard", self.plugin, body="stream")
        self.handler = self.host.runner.wrap(handler)

    def __call__(self, request: Request) -> HandlerResult:
        return self.handler(request)

    def address_of(self, request: Request) -> str:
        return self.plugin.shell.address_of(request)

    def client_of(self, request: Request) -> str:
        return self.plugin.shell.client_of(request)


def _no_models(name: str) -> object:
    raise LookupError(name)

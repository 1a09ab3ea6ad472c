"""What a plugin's phases get: :class:`Context`, one per request, and :class:`Host`, one per
plugin (at startup)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webtorch.http.messages import Headers, Request, Response
from webtorch.vocab import Upstream

if TYPE_CHECKING:
    from webtorch.plugins.models import ModelHandle
    from webtorch.plugins.table import Chain

# A served model by name (plugins/models.py), or ServiceUnavailable.
ModelSource = Callable[[str], "ModelHandle"]


def _no_models(name: str) -> ModelHandle:
    from webtorch.errors import ServiceUnavailable

    raise ServiceUnavailable(f"model {name!r}: this server serves no models to plugins")


class Context:
    """One request as its plugins see it, from ``request`` to ``log``. ``state`` is theirs to
    carry anything from one phase to the next (a plugin's own keys: prefix them with its name).

    The request itself is ``request`` (its headers a list of lower-case ``(name, value)``
    bytes pairs that ``request`` may edit before the route sees them); ``response`` is set once
    there is one. ``log`` sees the outcome: ``status``, ``sent`` (body bytes), ``seconds`` (from
    the request's arrival to its last byte out), the upstream, retries and the guard's score.
    """

    __slots__ = (
        "chain",
        "errors",
        "models",
        "policy",
        "request",
        "response",
        "seconds",
        "sent",
        "started",
        "state",
        "status",
    )

    def __init__(self, request: Request, chain: Chain, models: ModelSource = _no_models) -> None:
        self.request = request
        self.chain = chain  # the plugins that see this request (routes), in order
        self.models = models
        self.state: dict[str, Any] = {}
        self.started = time.monotonic()
        self.response: Response | None = None
        # The plugins that failed in this request, "name.phase" each (log sees them).
        self.errors: list[str] = []
        self.status = 0
        self.sent = 0
        self.seconds = 0.0
        # In pick only: the group's policy, ``ctx.policy(candidates)`` -> the upstream it
        # would choose among them (sticky cookie first), to wrap it.
        self.policy: Callable[[Sequence[Upstream]], Upstream] | None = None

    # -- the request -------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def query(self) -> str:
        return self.request.query

    @property
    def client(self) -> str:
        """The peer's address."""
        return self.request.client

    @property
    def headers(self) -> Headers:
        return self.request.headers

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), decoded as latin-1; None if absent."""
        value = self.request.header(name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")

    def set_header(self, name: str, value: str) -> None:
        """Replace header ``name`` of the request (what the route sees and a proxy forwards)."""
        key = name.lower().encode("latin-1")
        kept = [(k, v) for k, v in self.request.headers if k != key]
        kept.append((key, value.encode("latin-1")))
        self.request.headers = kept

    # -- what happened (log) -----------------------------------------------------------------

    @property
    def route(self) -> str:
        return self.request.route

    @property
    def upstream(self) -> str:
        """The upstream address the last attempt went to ("" when not proxied)."""
        return self.request.upstream

    @property
    def retries(self) -> int:
        return self.request.retries

    @property
    def guard_score(self) -> float | None:
        return self.request.guard_score

    @property
    def guard_action(self) -> str:
        return self.request.guard_action

    # -- torch -------------------------------------------------------------------------------

    def model(self, name: str) -> ModelHandle:
        """A model this server serves: ``await ctx.model("spam").predict(x)``, batched with
        every other request to it; ``await ctx.model("cost").train(x, y)`` through its trainer
        (WAL, checkpoints) when its training is on."""
        return self.models(name)

    def __repr__(self) -> str:
        return f"<Context {self.request.method} {self.request.path!r} status={self.status}>"


class Host:
    """What a plugin's ``startup`` gets: its name, file, settings table, a logger named after
    it, and the served models (as ``ctx.model``)."""

    def __init__(
        self, name: str, path: Path, settings: Mapping[str, Any], models: ModelSource
    ) -> None:
        self.name = name
        self.path = path
        self.settings = settings
        self.log = logging.getLogger(f"webtorch.plugin.{name}")
        self._models = models

    def model(self, name: str) -> ModelHandle:
        return self._models(name)

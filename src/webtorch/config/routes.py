"""``[[routes]]``: an exact path or a prefix, answered by a model, a fixed response or an upstream
group; and the routes the server keeps for itself."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from webtorch.config.base import Strict

# What app.py routes itself; a [[routes]] entry with the same path or prefix would collide.
BUILTIN_ROUTES = frozenset(
    {
        ("path", "/v2"),
        ("path", "/v2/health/load"),  # load reports for balancers (proxy/probe.py)
        ("path", "/metrics"),
        ("path", "/admin/reload"),
        ("path", "/dashboard"),  # the live dashboard page (observe/dashboard.py)
        ("path", "/guard/feedback"),  # labels for the guard's online adaptation
        ("prefix", "/dashboard/"),  # its stats endpoint and static files
        ("prefix", "/v2/"),
        ("prefix", "/v2/repository/"),
        ("prefix", "/models/"),
    }
)


class RouteConfig(Strict):
    """An exact ``path`` or a ``prefix``, answered by a model's short form, a fixed response or
    an upstream group (proxied)."""

    path: str | None = None
    prefix: str | None = None
    model: str | None = None
    return_: int | None = Field(default=None, alias="return", ge=100, le=599)
    upstream: str | None = None
    body: str = ""
    content_type: str = "text/plain"
    # Proxied routes stream request bodies, so their size limit is their own (nginx's
    # client_max_body_size); None: server.limits.max_body.
    max_body: Annotated[int, Field(ge=0)] | None = None
    # Retry POST, PATCH... after they were sent (nginx: proxy_next_upstream non_idempotent).
    retry_non_idempotent: bool = False
    # WebSocket upgrades are piped to the upstream (streams/tunnel.py); needs [streams].
    websocket: bool = False

    @model_validator(mode="after")
    def _check(self) -> RouteConfig:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("a route needs exactly one of `path` or `prefix`")
        where = self.path if self.path is not None else self.prefix
        assert where is not None
        if not where.startswith("/"):
            raise ValueError("`path` and `prefix` start with '/'")
        targets = [t for t in (self.model, self.return_, self.upstream) if t is not None]
        if len(targets) != 1:
            raise ValueError("a route needs exactly one of `model`, `return` or `upstream`")
        if self.upstream is None and (
            self.max_body is not None or self.retry_non_idempotent or self.websocket
        ):
            raise ValueError(
                "`max_body`, `retry_non_idempotent` and `websocket` are for `upstream` routes"
            )
        return self

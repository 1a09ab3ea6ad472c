"""``[server]``: where it listens, TLS, limits, the token, management, origins, trusted proxies,
the access log."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from webtorch.config.base import Strict, check_networks, parse_listen
from webtorch.http.limits import Limits

# A web origin as browsers send it in `Origin` (no path, no trailing slash, no userinfo).
_ORIGIN = re.compile(
    r"https?://(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?", re.IGNORECASE
)


class TLSConfig(Strict):
    cert: Path
    key: Path


# The server's limits as compiled code reads them (http/limits.py), whose defaults are the one
# copy: this section validates them (an error names the key) and defaults to them.
_LIMITS = Limits()


class LimitsConfig(Strict):
    """``[server.limits]``: sizes and timeouts, each > 0 (see :class:`Limits` for what each
    bounds)."""

    max_url: Annotated[int, Field(gt=0)] = _LIMITS.max_url
    max_header_bytes: Annotated[int, Field(gt=0)] = _LIMITS.max_header_bytes
    max_headers: Annotated[int, Field(gt=0)] = _LIMITS.max_headers
    max_body: Annotated[int, Field(gt=0)] = _LIMITS.max_body
    header_timeout: Annotated[float, Field(gt=0)] = _LIMITS.header_timeout
    body_timeout: Annotated[float, Field(gt=0)] = _LIMITS.body_timeout
    keepalive_timeout: Annotated[float, Field(gt=0)] = _LIMITS.keepalive_timeout
    max_pipeline: Annotated[int, Field(gt=0)] = _LIMITS.max_pipeline
    drain_timeout: Annotated[float, Field(gt=0)] = _LIMITS.drain_timeout
    # Lowered at start to what the file descriptor limit (ulimit -n) leaves room for.
    max_connections: Annotated[int, Field(gt=0)] = _LIMITS.max_connections


class AccessLogConfig(Strict):
    """One JSON line per request, written by a background thread (observe/access_log.py)."""

    # A file (relative to the config's directory; reopened on SIGUSR1, for logrotate) or "-"
    # for standard output.
    path: Annotated[str, Field(min_length=1)]
    # The share of requests logged (5xx answers always are).
    sample: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Lines queued for the writer at most; beyond, lines are dropped and counted, never waited
    # for (a slow disk must not slow serving).
    buffer: Annotated[int, Field(ge=1)] = 10000


class MasterConfig(Strict):
    """How the master process of ``server.workers > 1`` watches its workers (webtorch/workers/)."""

    # A worker whose event loop has not ticked for this long is stuck: SIGKILLed and replaced.
    heartbeat_timeout: Annotated[float, Field(gt=0)] = 10.0
    # A worker may take this long to load its models and listen (torch's import alone can take
    # most of a minute on a busy machine); past it, it is killed and counts as a failed start.
    start_timeout: Annotated[float, Field(gt=0)] = 300.0
    # A worker that dies is started again after restart_delay, doubled per failure in a row up to
    # restart_delay_max; one that ran stable_after seconds ends the row.
    restart_delay: Annotated[float, Field(ge=0)] = 0.1
    restart_delay_max: Annotated[float, Field(ge=0)] = 10.0
    stable_after: Annotated[float, Field(gt=0)] = 30.0
    # On SIGTERM, workers get limits.drain_timeout plus this to exit before they are SIGKILLed.
    stop_timeout: Annotated[float, Field(gt=0)] = 10.0
    # How workers share the port: "shared", one listening socket the master opens and every
    # worker accepts from, or "reuseport", a socket per worker with SO_REUSEPORT (the kernel
    # spreads connections by a hash). BENCHMARKS.md ("Workers") has the numbers behind the
    # default.
    listen_socket: Literal["shared", "reuseport"] = "reuseport"


class ServerConfig(Strict):
    listen: str = "127.0.0.1:8080"
    tls: TLSConfig | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Bearer token for training and management endpoints; `token_env` names an environment
    # variable holding it, so the secret need not sit in a file that is checked in.
    token: str | None = Field(default=None, min_length=16, repr=False)
    token_env: str | None = None
    # The model repository endpoints (/v2/repository/...: list, load, reload, unload models) and
    # POST /admin/reload (re-read the config's upstreams and routes); off unless enabled,
    # token-protected when a token is set.
    management: bool = False
    # Web origins (scheme://host[:port]) whose pages may train and manage, like the server's own
    # pages. From any other origin a state-changing request is refused (403): CSRF protection,
    # token or not. Needed only for a browser app served from elsewhere.
    allowed_origins: list[str] = Field(default_factory=list)
    # Proxies whose X-Forwarded-For / -Proto / -Host are believed (addresses or CIDR blocks);
    # from anyone else those headers are replaced, never extended.
    trusted_proxies: list[str] = Field(default_factory=list)
    # The only directory `POST /v2/repository/models/{m}/load` loads model files ({m}.py) from.
    model_dir: Path | None = None
    # The live dashboard at /dashboard and its JSON stats at /dashboard/stats; token-protected
    # when a token is set. It shows traffic, not data, so it is on by default, as /metrics is.
    dashboard: bool = True
    # The access log; absent: none.
    access_log: AccessLogConfig | None = None
    # Give every request an id (the client's X-Request-Id when sane, else a new one), send it to
    # upstreams and answer it as X-Request-Id.
    request_id: bool = True
    # Processes that serve: 1 serves in this process; N > 1 (or "auto": the usable cores) starts
    # a master that runs N workers on the one port (ARCHITECTURE.md, "Processes").
    workers: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    master: MasterConfig = Field(default_factory=MasterConfig)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str) -> str:
        parse_listen(listen)  # a field validator, so the error names server.listen
        return listen

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        normalized = []
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not a web origin: scheme://host[:port], no path "
                    "(e.g. https://app.example.com)"
                )
            normalized.append(origin.lower())
        return normalized

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, proxies: list[str]) -> list[str]:
        return check_networks(proxies)

    @model_validator(mode="after")
    def _check_token(self) -> ServerConfig:
        if self.token is not None and self.token_env is not None:
            raise ValueError("set one of `token` or `token_env`, not both")
        if self.token_env is not None and len(os.environ.get(self.token_env, "")) < 16:
            raise ValueError(
                f"token_env: environment variable {self.token_env} is unset or shorter than "
                "16 characters"
            )
        return self

    @property
    def worker_count(self) -> int:
        """``workers``, with "auto" as the CPUs this process may run on."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers

    @property
    def bearer_token(self) -> str | None:
        if self.token_env is not None:
            return os.environ.get(self.token_env)
        return self.token

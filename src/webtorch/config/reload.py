"""Reloading a running server's config: which [server] keys a reload applies in place, and the
one check a single server (app.py) and the master of several workers (workers/) both make."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from webtorch.config.base import parse_listen
from webtorch.config.root import Config
from webtorch.config.server import ServerConfig
from webtorch.errors import ConfigError

# The [server] keys a reload applies to the running server; a change to any other key (listen,
# tls, access_log, trusted_proxies, workers, and keys added later unless listed here) needs a
# restart, and a reload that finds one refuses the whole file rather than half-apply it.
RELOADABLE: frozenset[str] = frozenset(
    {
        "token",  # token and token_env: the one Auth every endpoint, the dashboard and the
        "token_env",  # guard share is reconfigured in place
        "allowed_origins",
        "management",
        "dashboard",
        "limits",  # new connections get the new limits (open ones keep theirs); the cap at once
        "request_id",
        "model_dir",
    }
)


class RestartRequired(ConfigError):
    """A reloaded file changes [server] settings that only a restart applies."""


def server_changes(old: ServerConfig, new: ServerConfig) -> list[str]:
    """The [server] keys whose values differ (token_env by the token it names)."""
    changed = [
        name for name in ServerConfig.model_fields if getattr(old, name) != getattr(new, name)
    ]
    if "token_env" not in changed and old.bearer_token != new.bearer_token:
        changed.append("token_env")
    return sorted(changed)


def reloaded(
    old: Config,
    new: Config,
    source: Path,
    *,
    models: Iterable[str],
    keep_listen: bool,
    host: str | None = None,
) -> tuple[Config, list[str]]:
    """``new`` (read from ``source``) as a reload of the running ``old`` applies it, with the
    [server] keys it changes; raises ConfigError (RestartRequired) naming what it cannot apply.
    ``models``: those loaded; ``keep_listen``: ``serve --listen`` overrode the file's listen,
    so the reload keeps it as the start did; ``host``: the address served. The one check both
    a single server (app.py) and the master of several workers make."""
    missing = sorted({rc.model for rc in new.routes if rc.model is not None} - set(models))
    if missing:
        raise ConfigError(f"{source}: routes name models that are not loaded: {missing}")
    if old.streams != new.streams:
        # The WebSocket connections open now live by the running [streams] (their limits, the
        # stream store's bounds): a restart applies a new one.
        raise RestartRequired(
            f"{source}: [streams] changed, which only a restart applies; nothing was reloaded"
        )
    server = new.server
    if keep_listen:
        server = server.model_copy(update={"listen": old.server.listen})
    changed = server_changes(old.server, server)
    restart = [key for key in changed if key not in RELOADABLE]
    if restart:
        raise RestartRequired(
            f"{source}: [server] {', '.join(restart)} changed, which only a restart "
            "applies; nothing was reloaded (restart, or undo the change and reload)"
        )
    new = new.model_copy(update={"server": server})
    problem = new.exposure_problem(host if host is not None else parse_listen(server.listen)[0])
    if problem is not None:
        raise ConfigError(problem)
    return new, changed

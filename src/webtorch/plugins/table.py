"""The phase table: built once per set of plugins (at start and at each reload), so that a
request asks nothing of the plugins that do not join a phase, and per plugin and phase the
calls, errors and seconds that /metrics and the dashboard show. Sans-IO: no loop, no sockets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from webtorch.plugins.api import REQUEST_PHASES
from webtorch.plugins.loader import Loaded

# Distinct sets of plugins (by route) whose chains are kept: a few in any real config.
_CHAINS_MAX: Final = 256


class PhaseStats:
    """One plugin's one phase: calls, failures (exceptions and timeouts), seconds spent (wall
    time: an async phase's includes its waiting)."""

    __slots__ = ("calls", "errors", "seconds", "timeouts")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.seconds = 0.0


# (plugin name, phase) -> its stats, kept by the host across reloads.
StatsStore = dict[tuple[str, str], PhaseStats]


class Plugin:
    """A loaded plugin in a running set: what the request path reads of it."""

    def __init__(self, loaded: Loaded, index: int, store: StatsStore) -> None:
        config = loaded.config
        self.loaded = loaded
        self.name = loaded.name
        self.index = index
        self.obj = loaded.obj
        self.closed = config.on_error == "closed"
        self.timeout = config.timeout
        self.body_stream = config.body == "stream"
        self.body_limit = config.body_limit
        self.routes = tuple(r.rstrip("/") for r in config.routes)
        # Per phase (and per periodic method, "every:<name>"); from ``store``, so that a
        # plugin's counters go on across reloads as Prometheus counters must.
        phases: list[str] = [
            p for p in (*REQUEST_PHASES, "startup", "shutdown") if p in loaded.hooks
        ]
        phases += [f"every:{name}" for _, name, _ in loaded.periodic]
        self.stats: dict[str, PhaseStats] = {
            phase: store.setdefault((self.name, phase), PhaseStats()) for phase in phases
        }

    def sees(self, path: str) -> bool:
        """Whether a request for ``path`` reaches this plugin (its routes: path prefixes)."""
        routes = self.routes
        if not routes:
            return True
        for route in routes:
            if path.startswith(route) and (len(path) == len(route) or path[len(route)] == "/"):
                return True
        return False


Hook = tuple[Plugin, Callable[..., Any]]


class Chain:
    """The hooks of one set of plugins, per phase, in order: what a request runs."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = tuple(plugins)

        def hooks(phase: str) -> tuple[Hook, ...]:
            return tuple((p, p.loaded.hooks[phase]) for p in plugins if phase in p.loaded.hooks)

        self.request = hooks("request")
        body = hooks("request_body")
        self.body_buffer = tuple(h for h in body if not h[0].body_stream)
        self.body_stream = tuple(h for h in body if h[0].body_stream)
        self.pick = hooks("pick")
        self.response = hooks("response")
        self.response_body = hooks("response_body")
        self.log = hooks("log")
        # Some request or request_body hook may wait: the request runs as a task.
        self.waits = any(
            "request" in p.loaded.waits or ("request_body" in p.loaded.waits) for p in plugins
        )
        # The smallest buffered-body limit, and whose (a 413 names it).
        limited = sorted(self.body_buffer, key=lambda h: h[0].body_limit)
        self.body_limit = limited[0][0].body_limit if limited else 0
        self.body_limiter = limited[0][0].name if limited else ""
        # Whether anything runs once the handler answered (else its result goes out as is).
        self.answers = bool(self.response or self.response_body)
        # Whether anything runs before the handler.
        self.before = bool(self.request or body)


class PluginSet:
    """The plugins of one config, in order (the server's own first, then ``order``, then the
    file's), and their chains."""

    def __init__(
        self,
        loaded: Sequence[Loaded],
        store: StatsStore | None = None,
        first: Sequence[Loaded] = (),
    ) -> None:
        ranked = sorted(enumerate(loaded), key=lambda item: (item[1].config.order, item[0]))
        store = {} if store is None else store
        # The server's own (the guard) before any configured plugin, whatever its order: what
        # they refuse reaches no user plugin's request phase.
        ordered = [*first, *(item for _, item in ranked)]
        self.first = tuple(first)
        self.configured = tuple(item for _, item in ranked)
        self.plugins = [Plugin(item, i, store) for i, item in enumerate(ordered)]
        self.everywhere = Chain(self.plugins)
        # Whether some plugin sees only some routes (else every request gets `everywhere`).
        self.routed = any(p.routes for p in self.plugins)
        self._chains: dict[tuple[bool, ...], Chain] = {}
        self.connect = tuple(
            (p, p.loaded.hooks["connect"]) for p in self.plugins if "connect" in p.loaded.hooks
        )
        self.disconnect = tuple(
            (p, p.loaded.hooks["disconnect"])
            for p in self.plugins
            if "disconnect" in p.loaded.hooks
        )
        self.picks = bool(self.everywhere.pick)

    def chain(self, path: str) -> Chain:
        """The chain of the plugins that see ``path``."""
        if not self.routed:
            return self.everywhere
        key = tuple(p.sees(path) for p in self.plugins)
        chain = self._chains.get(key)
        if chain is None:
            chain = Chain([p for p, seen in zip(self.plugins, key, strict=True) if seen])
            if len(self._chains) < _CHAINS_MAX:
                self._chains[key] = chain
        return chain

    def __len__(self) -> int:
        return len(self.plugins)

"""``[streams]`` made into a running service: the hub of WebSocket connections, the stream store,
the model streams and the proxied WebSocket routes, installed as the server's upgrade hook; its
/metrics families; its sweep and drain. The app makes one when the config has ``[streams]``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from webtorch.config import StreamsConfig
from webtorch.http.messages import Request
from webtorch.http.router import Route, Router
from webtorch.http.state import AccessLogger, ServerState
from webtorch.proxy.upstream import ProxyRoute
from webtorch.streams.hub import Hub
from webtorch.streams.models import ModelStreams
from webtorch.streams.store import StreamStore
from webtorch.streams.tunnel import Tunnels
from webtorch.streams.upgrade import Upgrades

log = logging.getLogger("webtorch.streams")

if TYPE_CHECKING:
    from webtorch.serve.executor import Executor
    from webtorch.serve.oip import Auth


class Streams:
    def __init__(
        self,
        settings: StreamsConfig,
        loop: asyncio.AbstractEventLoop,
        executors: Callable[[str], Executor | None],
        proxied: Callable[[Request], ProxyRoute | None] | None = None,
        auth: Auth | None = None,
    ) -> None:
        self.loop = loop
        self.hub = Hub(settings, loop.time)
        self.store = StreamStore(settings.max_streams, settings.max_state_bytes, settings.expiry)
        self.models = ModelStreams(self.hub, self.store, executors, auth)
        self.proxied = proxied
        self.tunnels: Tunnels | None = None
        self.upgrades = Upgrades(self.hub, [self.models.find])

    def install(
        self,
        state: ServerState,
        access_log: AccessLogger | None = None,
        router: Router | None = None,
        models: Iterable[str] = (),
    ) -> None:
        """The upgrade hook; the NDJSON form's streamed route before the router's own streamed
        routes (read live, so reloads reach them); and for each of ``models`` that streams,
        the route of its watchers (server-sent events)."""
        match = router.match if router is not None else None
        if self.proxied is not None:
            self.tunnels = Tunnels(self.hub, self.proxied, access_log)
            self.upgrades.finders.append(self.tunnels.find)
        state.upgrade = self.upgrades
        streams = self.models

        def stream_match(path: str) -> Route | None:
            route = streams.route(path)
            if route is not None or match is None:
                return route
            found = match(path)
            return found if found is not None and found.stream else None

        state.stream_match = stream_match
        for name in models:
            executor = self.models.executors(name)
            if router is None or executor is None or executor.model.spec.stream is None:
                continue
            path = f"/v2/models/{name}/stream"
            try:
                router.add(Route(path, self.models.watch, path))
            except ValueError:  # a [[routes]] entry has the path: it stays the config's
                log.warning("%s is a configured route: its stream cannot be watched", path)
        self.hub.start(self.loop)
        self.hub.sweepers.append(self.store.sweep)

    async def drain(self, grace: float) -> None:
        self.hub.stop()
        await self.hub.drain(grace)

    def metric_families(self) -> Iterator[Metric]:
        hub = self.hub
        yield GaugeMetricFamily(
            "webtorch_websocket_connections", "WebSocket connections open now", value=len(hub.open)
        )
        yield CounterMetricFamily(
            "webtorch_websocket_accepted", "WebSocket connections accepted", value=hub.accepted
        )
        yield CounterMetricFamily(
            "webtorch_websocket_refused",
            "WebSocket upgrades refused at streams.max_connections",
            value=hub.refused,
        )
        yield from self.models.metric_families()
        tunnels = self.tunnels
        if tunnels is not None:
            stats = tunnels.stats
            yield CounterMetricFamily(
                "webtorch_websocket_proxied",
                "WebSocket upgrades proxied and piped (the upstream answered 101)",
                value=stats.opened,
            )
            yield CounterMetricFamily(
                "webtorch_websocket_proxy_failed",
                "Proxied WebSocket upgrades that did not open (no upstream, unreachable, refused)",
                value=stats.failed,
            )
            yield CounterMetricFamily(
                "webtorch_websocket_proxy_bytes_up",
                "Bytes piped from WebSocket clients to upstreams",
                value=stats.bytes_up,
            )
            yield CounterMetricFamily(
                "webtorch_websocket_proxy_bytes_down",
                "Bytes piped from upstreams to WebSocket clients",
                value=stats.bytes_down,
            )

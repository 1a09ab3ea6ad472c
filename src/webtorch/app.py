"""Wires a Config into models, executors, routes, metrics and the HTTP server, and runs them."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from webtorch import __version__
from webtorch import config as config_file
from webtorch.config import (
    BUILTIN_ROUTES,
    Config,
    GuardConfig,
    RestartRequired,
    ServerConfig,
    parse_listen,
    reloaded,
)
from webtorch.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
)
from webtorch.http.limits import Limits
from webtorch.http.messages import Handler, HandlerResult, Request, Response, json_response
from webtorch.http.router import Route, Router
from webtorch.http.server import HttpServer
from webtorch.metrics import Metrics, connection_families
from webtorch.observe.access_log import AccessLog
from webtorch.observe.dashboard import Dashboard
from webtorch.observe.timeline import Timeline
from webtorch.plugins.host import Base, PluginHost, install
from webtorch.plugins.metrics import board as plugin_board
from webtorch.plugins.metrics import metric_families as plugin_metrics
from webtorch.plugins.models import model_source
from webtorch.proxy.probe import LOAD_PATH, LoadReport
from webtorch.proxy.upstream import Proxies, ProxyRoute
from webtorch.serve.oip import EXTENSIONS, Auth, ModelRoutes
from webtorch.serve.repository import ModelRepository
from webtorch.shared.store import StateStore

if TYPE_CHECKING:
    # These bring torch (the guard's network, models and executors): imported where a config
    # uses them, so that a server that only proxies and serves fixed answers never loads torch.
    from webtorch.config import TrainConfig
    from webtorch.guard.core import Guard
    from webtorch.guard.feedback import Feedback
    from webtorch.metrics import TrainStats
    from webtorch.pipeline.placement import PlacementFactory
    from webtorch.pipeline.service import Pipelines
    from webtorch.serve.endpoint import ModelEndpoint
    from webtorch.serve.executor import Executor
    from webtorch.serve.model import LoadedModel
    from webtorch.serve.trainers import Trainers
    from webtorch.streams.service import Streams
    from webtorch.train.trainer import Trainer

log = logging.getLogger("webtorch")


def _trainer(
    model: LoadedModel, config: TrainConfig, state_dir: Path, stats: TrainStats
) -> Trainer:
    """A model's trainer, for the repository (serve/, which imports nothing from train/ at
    runtime); torch comes with it, so it is imported when a model first trains."""
    from webtorch.train.trainer import Trainer

    return Trainer(model, config, state_dir, stats)


class App:
    """Models are loaded at construction (errors surface before any socket opens); executors,
    routes and the server are made in :meth:`start`, on the running loop."""

    def __init__(
        self,
        config: Config,
        path: Path | None = None,
        *,
        listen_from_cli: bool = False,
        stages: set[str] | None = None,
        placement: Trainers | None = None,
    ) -> None:
        self.metrics = Metrics()
        # Pipelines first: `--stages` serves only the models its stages need.
        self.pipelines: Pipelines | None = None
        # The placement of stages whose settings name a remote upstream group (pipeline/).
        self.remote_placement: PlacementFactory | None = None
        if config.pipelines or stages is not None:
            from webtorch.pipeline.service import Pipelines

            self.pipelines = Pipelines(config, self.metrics, stages)
            if stages is not None:
                needed = self.pipelines.needed_models()
                config = config.model_copy(
                    update={"models": {n: m for n, m in config.models.items() if n in needed}}
                )
        self.config = config
        self.path = path  # the file a reload re-reads (None: reload refused)
        # `serve --listen` overrode the file's listen: a reload keeps the command line's, as
        # the start did, instead of seeing a change that needs a restart.
        self.listen_from_cli = listen_from_cli
        self._host: str | None = None  # the address served, once started
        # A worker's way to listen (webtorch/workers/worker.py): its master's socket, or a socket
        # of its own beside the other workers' (SO_REUSEPORT). Neither: bind server.listen.
        self.listen_socket: socket.socket | None = None
        self.reuse_port = False
        # What GET /metrics answers: this process's metrics (a worker of several sums them all).
        self.scrape: Handler = self.metrics.handle
        # One Auth for every endpoint that checks the token (and CSRF): a reload reconfigures it.
        self.auth = Auth(config.server.bearer_token, config.server.allowed_origins)
        self.dashboard: Dashboard | None = None
        self._extensions: list[str] = []  # /v2's extensions, made with the routes
        self.placement = placement
        self.repository = ModelRepository(config, self.metrics, self.auth, _trainer, placement)
        self.server: HttpServer | None = None
        # A trainer worker's second listener: the train requests other workers forward to it.
        self.forwarded: HttpServer | None = None
        self._ready = False
        self._compaction: asyncio.TimerHandle | None = None
        self.proxies: Proxies | None = None
        # [streams]: WebSocket model streams and proxied WebSocket routes (streams/).
        self.streams: Streams | None = None
        self._websocket_routes: dict[str, ProxyRoute] = {}  # route path -> its upstreams
        # State every worker of a master must see alike (set by workers/worker.py before start;
        # None: one process, each object keeps its own).
        self.shared: StateStore | None = None
        self.router: Router | None = None
        self.guard: Guard | None = None
        self.feedback: Feedback | None = None
        self.access_log: AccessLog | None = None
        self.timeline = Timeline(
            self.metrics,
            lambda: self.proxies,
            lambda: len(self.server.state.connections) if self.server is not None else 0,
            guard=lambda: self.guard,
        )
        self.metrics.sources.append(self.timeline.metric_families)
        # [[plugins]]: loaded now, so that a bad file stops the start before a socket opens.
        self.plugins = PluginHost(
            config.plugins, config.base_dir, model_source(self.repository.endpoints)
        )
        self.metrics.sources.append(functools.partial(plugin_metrics, self.plugins.store))
        self._base: Base | None = None  # the server's own hooks, which plugins wrap

    @property
    def models(self) -> dict[str, LoadedModel]:
        return self.repository.models()

    @property
    def pipeline_names(self) -> list[str]:
        """``pipeline NAME`` for each pipeline served (the startup line lists them)."""
        return [] if self.pipelines is None else [f"pipeline {n}" for n in self.pipelines.served]

    @property
    def executors(self) -> dict[str, Executor]:
        return {name: served.executor for name, served in self.repository.served.items()}

    def ready(self) -> bool:
        return self._ready and not (self.server is not None and self.server.state.draining)

    def build_handler(self, loop: asyncio.AbstractEventLoop) -> Handler:
        repository = self.repository
        # A list ModelRoutes keeps: a reload that turns management on or off edits it in place.
        self._extensions = [*EXTENSIONS, *(["model_repository"] if repository.enabled else [])]
        models = ModelRoutes(repository.endpoints, self.ready, __version__, self._extensions)
        server = self.config.server
        dashboard = Dashboard(
            self.timeline,
            self.metrics,
            lambda: self.proxies,
            self.auth,
            server.dashboard,
            guard=lambda: self.guard,
            plugins=lambda: plugin_board(self.plugins.store),
        )
        self.dashboard = dashboard
        builtins: dict[tuple[str, str], Handler] = {
            ("path", "/v2"): models.oip,
            ("path", LOAD_PATH): LoadReport(lambda: self.server, self.metrics),
            ("prefix", "/v2/"): models.oip,
            ("prefix", "/v2/repository/"): repository.handle,
            ("prefix", "/models/"): models.short,
            ("path", "/metrics"): self.scrape,
            ("path", "/admin/reload"): self._admin_reload,
            ("path", "/guard/feedback"): self._guard_feedback,
            ("path", "/dashboard"): dashboard,
            ("prefix", "/dashboard/"): dashboard,
        }
        # config.py refuses user routes that would shadow these; keep the two lists one list.
        assert set(builtins) == BUILTIN_ROUTES
        # What refuses a request before its body is read (see Route.check).
        checks: dict[tuple[str, str], Callable[[Request], None]] = {
            ("prefix", "/v2/"): models.check,
            ("prefix", "/v2/repository/"): repository.check,
            ("prefix", "/models/"): models.check,
            ("path", "/admin/reload"): self._management,
            ("path", "/guard/feedback"): self._management,
        }
        router = Router(
            [
                Route(
                    where,
                    handler,
                    where.rstrip("/") or "/",
                    prefix=kind == "prefix",
                    check=checks.get((kind, where)),
                )
                for (kind, where), handler in builtins.items()
            ]
        )
        repository.start(loop, router)
        self.proxies = Proxies(loop, self.shared)
        self.metrics.sources.append(self.proxies.metric_families)
        self.router = router
        router.replace_user_routes(self._user_routes(self.config))
        if self.pipelines is not None:
            if self.remote_placement is None:
                from webtorch.pipeline import remote

                # Groups are looked up per batch: a reload replaces them.
                self.remote_placement = remote.factory(lambda: self.proxies, self.metrics)
            # After the upstream groups exist: a remote stage's placement sends to one.
            self.pipelines.install(
                loop, router, repository.endpoints, self.auth, self.remote_placement
            )
        return router

    def _user_routes(self, config: Config) -> list[Route]:
        """The handlers of the config's [[routes]] (and its upstream groups, made anew)."""
        assert self.proxies is not None
        proxy_route = self.proxies.configure(config)
        websocket_routes: dict[str, ProxyRoute] = {}
        routes = []
        for rc in config.routes:
            where = rc.path if rc.path is not None else rc.prefix
            assert where is not None
            handler: Handler
            if rc.model is not None:
                # Looked up per request: a reload replaces the model's endpoint.
                handler = functools.partial(_predict, self.repository.endpoints, rc.model)
            elif rc.upstream is not None:
                limit = rc.max_body if rc.max_body is not None else config.server.limits.max_body
                handler = proxy_route(rc)
                if rc.websocket:
                    websocket_routes[where] = handler
                if config.plugins or config.guard is not None:
                    # Its requests with a body come here, not to the server's handler: the
                    # plugins (the guard first) are asked here.
                    handler = functools.partial(self.plugins.runner.streamed, handler)
                routes.append(
                    Route(
                        where,
                        handler,
                        where,
                        prefix=rc.prefix is not None,
                        stream=True,
                        max_body=limit,
                        user=True,
                    )
                )
                continue
            else:
                assert rc.return_ is not None
                handler = _fixed(Response(rc.return_, rc.body.encode(), rc.content_type.encode()))
            routes.append(Route(where, handler, where, prefix=rc.prefix is not None, user=True))
        self._websocket_routes = websocket_routes
        return routes

    def _websocket_route(self, request: Request) -> ProxyRoute | None:
        """The upstreams of a proxied WebSocket route (``websocket = true``) for ``request``."""
        route = self.router.match(request.path) if self.router is not None else None
        return None if route is None else self._websocket_routes.get(route.name)

    def _stream_executor(self, name: str) -> Executor | None:
        endpoint = self.repository.endpoints.get(name)
        return None if endpoint is None else endpoint.executor

    def reload(self) -> str:
        """Re-read the config file and swap in its upstreams and routes without dropping a
        connection: requests in flight finish on the groups they started with. [server] keys in
        RELOADABLE (the token above all) apply at once; a change to any other [server] key
        raises RestartRequired and nothing is swapped. Models stay as they are (models change
        through the repository API)."""
        if self.path is None or self.router is None:
            raise ConfigError("no config file to reload (serving the embedded default)")
        new, changed = reloaded(
            self.config,
            config_file.load(self.path),
            self.path,
            models=self.repository.endpoints,
            keep_listen=self.listen_from_cli,
            host=self._host,
        )
        server = new.server
        plugins = self.plugins.reload(new.plugins, new.base_dir)  # a bad file: nothing changes
        self.router.replace_user_routes(self._user_routes(new))
        if new.upstreams and self.server is not None and self.server.state.stream_match is None:
            # Proxied routes stream their request bodies (the first upstreams may come now).
            self.server.state.stream_match = self.router.match_stream
        self._apply_server(server)
        pipelines_changed = new.pipelines != self.config.pipelines
        self.config = new
        message = (
            f"reloaded {self.path}: {len(new.upstreams)} upstream(s), {len(new.routes)} route(s)"
        )
        if changed:
            message += f"; applied [server] {', '.join(changed)}"
        if new.plugins or len(self.plugins.plugins):
            message += f"; {plugins}"
        self._install_plugins()  # the new groups' pickers (the set itself once started)
        if pipelines_changed:  # their files, workers and queues are made once, at the start
            message += "; [pipelines] changed: only a restart applies them"
        log.info("%s", message)
        return message

    def _apply_server(self, server: ServerConfig) -> None:
        """The RELOADABLE [server] settings, into the objects that read them per request."""
        self.auth.configure(server.bearer_token, server.allowed_origins)
        repository = self.repository
        repository.enabled = server.management
        repository.config = repository.config.model_copy(update={"server": server})
        extension = "model_repository"
        if server.management and extension not in self._extensions:
            self._extensions.append(extension)
        elif not server.management and extension in self._extensions:
            self._extensions.remove(extension)
        if self.dashboard is not None:
            self.dashboard.enabled = server.dashboard
        if self.server is not None:
            # New connections get the new limits; the connection cap applies at once.
            self.server.apply_limits(Limits(**server.limits.model_dump()))
            self.server.state.request_ids = server.request_id
        if self.forwarded is not None:
            self.forwarded.apply_limits(Limits(**server.limits.model_dump()))

    def _management(self, request: Request) -> None:
        """A management endpoint's checks: on by config, POST, not sendable by a page elsewhere
        (CSRF), the token."""
        if not self.config.server.management:
            raise NotFound("the management endpoints are off (server.management = false)")
        if request.method != "POST":
            self.auth.check(request)
            raise MethodNotAllowed(f"use POST {request.path}", ("POST",))
        self.auth.check_change(request)

    def _admin_reload(self, request: Request) -> HandlerResult:
        self._management(request)
        try:
            message = self.reload()
        except RestartRequired as exc:
            raise Conflict(str(exc)) from None
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        return json_response({"reloaded": True, "message": message})

    async def start(self, host: str | None = None, port: int | None = None) -> HttpServer:
        loop = asyncio.get_running_loop()
        handler = self.build_handler(loop)
        if self.pipelines is not None:
            await self.pipelines.start()  # process placements spawn their workers
        cfg_host, cfg_port = parse_listen(self.config.server.listen)
        self._host = host if host is not None else cfg_host
        problem = self.config.exposure_problem(self._host)
        if problem is not None:
            raise ConfigError(problem)
        assert self.router is not None
        if self.config.guard is not None:
            self._guard(self.config.guard)  # the first plugin
        access_log = self._open_access_log()
        await self.plugins.start()  # their startup before the first request
        self.server = HttpServer(
            handler,
            host if host is not None else cfg_host,
            port if port is not None else cfg_port,
            limits=Limits(**self.config.server.limits.model_dump()),
            observer=self.metrics.observe_request,
            ssl_context=self._ssl_context(),
            stream_match=self.router.match_stream if self.config.upstreams else None,
            access_log=access_log.record if access_log is not None else None,
            request_ids=self.config.server.request_id,
            sock=self.listen_socket,
            reuse_port=self.reuse_port,
        )
        try:
            await self.server.start()
            await self._listen_forwarded(handler)
        except BaseException:
            if access_log is not None:
                access_log.close()
            raise
        state = self.server.state
        # 100 Continue only for a request that its route would take (no token: a 401 instead).
        state.expect_check = self.router.precheck
        self._base = Base(state.handler, state.access_log, state.gate)
        self.plugins.on_change = self._install_plugins
        self._install_plugins()
        state.sent_observer = self.metrics.observe_sent
        if self.config.streams is not None:
            from webtorch.streams.service import Streams

            self.streams = Streams(
                self.config.streams, loop, self._stream_executor, self._websocket_route, self.auth
            )
            self.streams.install(
                state,
                access_log.record if access_log is not None else None,
                self.router,
                list(self.repository.endpoints),
            )
            self.metrics.sources.append(self.streams.metric_families)
        self.metrics.sources.append(
            lambda: connection_families(
                len(state.connections),
                state.accepted,
                state.reclaimed,
                state.refused,
                state.max_connections,
            )
        )
        # Everything allocated so far (torch, models, routes) lives as long as the process: move it
        # out of the collector's sight so a generation-2 collection does not walk it mid-request.
        gc.freeze()
        # A request allocates tens of tracked objects and frees nearly all by reference count,
        # yet at the default threshold (700) a young-generation collection runs every few
        # dozen requests, walking everything in flight. Measured on the proxy path: ~8% of its
        # CPU per request. Cyclic garbage now waits for 20,000 allocations instead of 700.
        gc.set_threshold(20_000, 10, 10)
        self._compact_metrics()
        self._ready = True
        return self.server

    def _install_plugins(self) -> None:
        """The running plugins' hooks into the server (plugins/host.py), or its own."""
        if self.server is not None and self._base is not None and self.proxies is not None:
            install(self.plugins, self.server.state, self._base, self.proxies.groups.values())

    async def _listen_forwarded(self, handler: Handler) -> None:
        """A trainer worker (server.workers > 1) also takes the train requests that the other
        workers forward (serve/train_forward.py) on a unix socket in the master's private directory:
        the router without the guard, which the receiving worker asked already, and neither
        access log nor request metrics, which it keeps (one line and one count per request).
        Opened after the models recovered from their WALs, so nothing is forwarded before."""
        placement = self.placement
        path = placement.listens() if placement is not None else None
        if path is None:
            return
        path.unlink(missing_ok=True)  # a trainer worker before this one was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(4096)
        except BaseException:
            sock.close()
            raise
        self.forwarded = HttpServer(
            handler, "", 0, limits=Limits(**self.config.server.limits.model_dump()), sock=sock
        )
        await self.forwarded.start()

    def _guard(self, settings: GuardConfig) -> None:
        """The guard, as the first of the plugins (guard/plugin.py): every request through it
        before the others and the route; its metrics and stats exposed."""
        from webtorch.guard.build import ADAPTED, make_guard, weights_of
        from webtorch.guard.build import state_dir as guard_state_dir
        from webtorch.guard.metrics import metric_families as guard_metrics
        from webtorch.guard.plugin import GuardPlugin
        from webtorch.guard.shell import GuardShell

        try:
            guard = make_guard(settings, self.config.base_dir, self.shared)
        except OSError as exc:
            raise ConfigError(f"guard.model: cannot load the detector: {exc}") from None
        self.guard = guard
        self.metrics.sources.append(functools.partial(guard_metrics, guard))
        weights = weights_of(settings, self.config.base_dir)
        if settings.feedback and guard.scorer is not None and weights is not None:
            from webtorch.guard.feedback import Feedback  # fine-tuning: torch

            save_to = guard_state_dir(settings, self.config.base_dir) / ADAPTED
            self.feedback = Feedback(guard.scorer, weights, save_to, batch=settings.feedback_batch)
        shell = GuardShell(
            guard,
            settings.client_key,
            feedback=self.feedback,
            trusted=self.auth.valid,  # False while no token is set (a reload may set one)
            trusted_proxies=self.config.server.trusted_proxies,
        )
        self.plugins.put_first("guard", GuardPlugin(shell), body="stream")

    def _guard_feedback(self, request: Request) -> HandlerResult:
        self._management(request)
        if self.feedback is None:
            raise NotFound("guard feedback is off (guard.feedback = false, or no detector)")
        return json_response(self.feedback.label(request.body), 202)

    def _open_access_log(self) -> AccessLog | None:
        settings = self.config.server.access_log
        if settings is None:
            return None
        path = self.config.access_log_path()
        access_log = AccessLog(path, sample=settings.sample, buffer=settings.buffer)
        try:
            access_log.open()
        except OSError as exc:
            raise ConfigError(f"server.access_log.path: cannot open {path}: {exc}") from None
        self.access_log = access_log
        self.metrics.sources.append(access_log.metric_families)
        return access_log

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log at its path (after logrotate moved the file)."""
        if self.access_log is not None:
            self.access_log.reopen()

    def _compact_metrics(self) -> None:
        """Fold the hot path's pending metric observations into buckets, once a second, and
        take the timeline's sample of that second (the dashboard's, and traffic shares)."""
        self.metrics.compact()
        self.timeline.sample()  # a few dozen microseconds; also feeds the traffic-share gauge
        loop = asyncio.get_running_loop()
        self._compaction = loop.call_later(1.0, self._compact_metrics)

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.server.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.resolve(tls.cert), self.config.resolve(tls.key))
        return ctx

    async def stop(self) -> None:
        """Graceful: stop accepting, finish in-flight requests, then the executors."""
        if self.server is not None:
            # The forwarded requests drain with the others: a worker draining beside this one
            # still waits for their answers.
            await asyncio.gather(
                self.server.shutdown(),
                *([self.forwarded.shutdown()] if self.forwarded is not None else []),
                *(
                    [self.streams.drain(self.server.state.limits.drain_timeout)]
                    if self.streams is not None
                    else []
                ),
            )
        if self._compaction is not None:
            self._compaction.cancel()
        await self.plugins.stop()
        if self.proxies is not None:
            self.proxies.close()
        if self.pipelines is not None:  # before the models: its model stages queue on them
            await self.pipelines.close()
        await self.repository.close()
        if self.feedback is not None:  # a fine-tuning round in progress finishes and is saved
            await self.feedback.wait()
            await asyncio.to_thread(self.feedback.close)
        if self.access_log is not None:  # last: every answered request is in it
            await asyncio.to_thread(self.access_log.close)

    def _reload_on_signal(self) -> None:
        try:
            self.reload()
        except ConfigError as exc:  # a bad file must not take the running server down
            log.error("reload failed, still serving the previous config: %s", exc)

    async def run(self, on_ready: Callable[[HttpServer], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        server = await self.start()
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
        log.info("shutting down: draining %d connection(s)", len(server.state.connections))
        await self.stop()


def _predict(endpoints: dict[str, ModelEndpoint], name: str, request: Request) -> HandlerResult:
    endpoint = endpoints.get(name)
    if endpoint is None:
        raise ServiceUnavailable(f"model {name!r} is not loaded")
    return endpoint.predict(request)


def _fixed(response: Response) -> Callable[[Request], HandlerResult]:
    def handler(request: Request) -> HandlerResult:
        return response

    return handler

"""Wires a Config into models, executors, routes, metrics and the HTTP server, and runs them."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Callable

from webtorch import __version__
from webtorch.config import BUILTIN_ROUTES, Config, model_paths, parse_listen, train_paths
from webtorch.errors import ConfigError
from webtorch.http.limits import Limits
from webtorch.http.messages import Handler, HandlerResult, Request, Response
from webtorch.http.router import Route, Router
from webtorch.http.server import HttpServer
from webtorch.observe.metrics import Metrics
from webtorch.serve.executor import Executor
from webtorch.serve.model import LoadedModel, load_model
from webtorch.serve.oip import Auth, ModelEndpoint, ModelRoutes
from webtorch.train.trainer import Trainer

log = logging.getLogger("webtorch")


class App:
    """Models are loaded at construction (errors surface before any socket opens); executors,
    routes and the server are made in :meth:`start`, on the running loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.models: dict[str, LoadedModel] = {
            name: load_model(
                name,
                config.resolve(mc.path),
                mc.device,
                config.weights(name),
            )
            for name, mc in config.models.items()
        }
        self.trainers: dict[str, Trainer] = {}
        for name, mc in config.models.items():
            if mc.train.enabled:
                trainer = Trainer(
                    self.models[name],
                    mc.train,
                    config.state_dir(name),
                    self.metrics.train(name),
                )
                trainer.recover()  # before any socket opens: replay errors stop the start
                self.trainers[name] = trainer
        self.executors: dict[str, Executor] = {}
        self.server: HttpServer | None = None
        self._ready = False
        self._compaction: asyncio.TimerHandle | None = None

    def ready(self) -> bool:
        return self._ready and not (self.server is not None and self.server.state.draining)

    def build_handler(self, loop: asyncio.AbstractEventLoop) -> Handler:
        endpoints: dict[str, ModelEndpoint] = {}
        auth = Auth(self.config.server.bearer_token)
        handler: Handler
        for name, model in self.models.items():
            mc = self.config.models[name]
            stats = self.metrics.model(name)
            executor = Executor(
                model,
                stats,
                max_batch=mc.max_batch,
                max_delay=mc.max_delay,
                max_queue=mc.max_queue,
                mode=mc.compute,
                loop=loop,
                trainer=self.trainers.get(name),
            )
            executor.warmup()
            self.executors[name] = executor
            endpoints[name] = ModelEndpoint(model, executor, stats, auth)
        models = ModelRoutes(endpoints, self.ready, __version__)
        builtins: dict[tuple[str, str], Handler] = {
            ("path", "/v2"): models.oip,
            ("prefix", "/v2/"): models.oip,
            ("prefix", "/models/"): models.short,
            ("path", "/metrics"): self.metrics.handle,
        }
        # config.py refuses user routes that would shadow these; keep the two lists one list.
        assert set(builtins) == BUILTIN_ROUTES
        router = Router(
            [
                Route(where, handler, where.rstrip("/") or "/", prefix=kind == "prefix")
                for (kind, where), handler in builtins.items()
            ]
        )
        for name, endpoint in endpoints.items():
            # Exact routes for the hot endpoints: one dict lookup, and a fixed metrics label.
            predict, infer = model_paths(name)
            for path, handler in ((predict, endpoint.predict), (infer, endpoint.infer)):
                router.add(Route(path, handler, path))
            if endpoint.trainable:
                short, oip = train_paths(name)
                for path, handler in ((short, endpoint.train), (oip, endpoint.train_oip)):
                    router.add(Route(path, handler, path))
        for rc in self.config.routes:
            where = rc.path if rc.path is not None else rc.prefix
            assert where is not None
            if rc.model is not None:
                handler = endpoints[rc.model].predict
            else:
                assert rc.return_ is not None
                handler = _fixed(Response(rc.return_, rc.body.encode(), rc.content_type.encode()))
            router.add(Route(where, handler, where, prefix=rc.prefix is not None))
        return router

    async def start(self, host: str | None = None, port: int | None = None) -> HttpServer:
        loop = asyncio.get_running_loop()
        handler = self.build_handler(loop)
        cfg_host, cfg_port = parse_listen(self.config.server.listen)
        problem = self.config.exposure_problem(host if host is not None else cfg_host)
        if problem is not None:
            raise ConfigError(problem)
        self.server = HttpServer(
            handler,
            host if host is not None else cfg_host,
            port if port is not None else cfg_port,
            limits=Limits(**self.config.server.limits.model_dump()),
            observer=self.metrics.observe_request,
            ssl_context=self._ssl_context(),
        )
        await self.server.start()
        # Everything allocated so far (torch, models, routes) lives as long as the process: move it
        # out of the collector's sight so a generation-2 collection does not walk it mid-request.
        gc.freeze()
        self._compact_metrics()
        self._ready = True
        return self.server

    def _compact_metrics(self) -> None:
        """Fold the hot path's pending metric observations into buckets, once a second."""
        self.metrics.compact()
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
            await self.server.shutdown()
        if self._compaction is not None:
            self._compaction.cancel()
        for executor in self.executors.values():
            await executor.close()

    async def run(self, on_ready: Callable[[HttpServer], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await self.start()
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
        log.info("shutting down: draining %d connection(s)", len(server.state.connections))
        await self.stop()


def _fixed(response: Response) -> Callable[[Request], HandlerResult]:
    def handler(request: Request) -> HandlerResult:
        return response

    return handler

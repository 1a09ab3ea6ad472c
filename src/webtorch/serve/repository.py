"""The live set of served models, and the OIP model repository extension that changes it.

``POST /v2/repository/index`` lists the models WebTorch knows: the configured ones and the model
files in ``server.model_dir``, with their state. ``POST /v2/repository/models/{m}/load`` loads a
model, or reloads it if it is served; ``.../unload`` stops serving it. These endpoints exist only
with ``server.management = true`` and need the server's token when one is configured; load and
unload also need ``Content-Type: application/json`` (an empty body is fine) and no cross-site
``Origin`` (CSRF: see :meth:`webtorch.serve.oip.Auth.check_change`).

Models are loaded only from the configuration or from ``{model_dir}/{m}.py``, by a name that must
be a plain file name: a request never names a path, a URL or a config of its own (TorchServe's
CVE-2023-43654 was a management API that fetched models from anywhere).

A reload swaps atomically: the new model is imported and built off the event loop while the old
one keeps serving; then the routes point to the new endpoint in one step and the old executor
drains, so requests already queued finish on the old model and later ones go to the new. A
trainable model's new executor holds its queue until the old one has written its final checkpoint
and the new trainer has recovered from it, so no training example is lost across a reload.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from webtorch.config import MODEL_NAME, Config, ModelConfig, model_paths, train_paths
from webtorch.errors import BadRequest, MethodNotAllowed, NotFound, WebTorchError
from webtorch.http.messages import HandlerResult, Request, Response, json_response
from webtorch.http.router import Route, Router
from webtorch.metrics import Metrics
from webtorch.serve.oip import Auth

if TYPE_CHECKING:
    # torch comes with these: imported when a first model is loaded (a server without models,
    # e.g. a plain proxy, never loads torch).
    from pathlib import Path

    from webtorch.config import TrainConfig
    from webtorch.metrics import TrainStats
    from webtorch.serve.endpoint import ModelEndpoint
    from webtorch.serve.executor import Executor
    from webtorch.serve.model import LoadedModel
    from webtorch.serve.trainers import Trainers
    from webtorch.train.trainer import Trainer

log = logging.getLogger("webtorch.repository")


@dataclass
class Served:
    """One model being served: everything a reload replaces together."""

    settings: ModelConfig
    model: LoadedModel
    trainer: Trainer | None
    executor: Executor
    endpoint: ModelEndpoint


@dataclass
class Prepared:
    """A model loaded (and, for the start-up load, recovered) but not yet serving."""

    settings: ModelConfig
    model: LoadedModel
    trainer: Trainer | None


# Builds a model's trainer: (model, its train settings, its state directory, its metrics). The
# app passes Trainer's (serve/ imports nothing from train/ at runtime: ARCHITECTURE.md).
TrainerFactory = Callable[["LoadedModel", "TrainConfig", "Path", "TrainStats"], "Trainer"]


class ModelRepository:
    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        auth: Auth,
        make_trainer: TrainerFactory,
        placement: Trainers | None = None,
    ) -> None:
        self.config = config
        # Which worker trains which model (server.workers > 1; None: this process trains all).
        self.placement = placement
        self.metrics = metrics
        self.auth = auth
        self._make_trainer = make_trainer
        # Shared with ModelRoutes, which dispatches the /v2 and /models/ prefixes through it.
        self.endpoints: dict[str, ModelEndpoint] = {}
        self.served: dict[str, Served] = {}
        self.failures: dict[str, str] = {}  # name -> why its last load failed
        self.enabled = config.server.management
        self._router: Router | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # Configured models, loaded before any socket opens so errors stop the start.
        self._initial = {
            name: self.prepare(name, mc, recover=True) for name, mc in config.models.items()
        }

    def models(self) -> dict[str, LoadedModel]:
        """The models loaded now (the configured ones from construction on)."""
        loaded = {name: prepared.model for name, prepared in self._initial.items()}
        loaded.update((name, served.model) for name, served in self.served.items())
        return loaded

    # -- loading ---------------------------------------------------------------------------------

    def settings_for(self, name: str) -> ModelConfig:
        """A model's settings: its [models.NAME] table, or defaults for a file in model_dir."""
        configured = self.config.models.get(name)
        if configured is not None:
            return configured
        model_dir = self.config.server.model_dir
        if model_dir is None:
            raise NotFound(f"no model {name!r} is configured (and server.model_dir is not set)")
        if not MODEL_NAME.fullmatch(name):
            raise BadRequest(f"invalid model name {name!r} (letters, digits, _ . -)")
        root = self.config.resolve(model_dir).resolve()
        path = (root / f"{name}.py").resolve()
        # The name pattern already excludes separators; resolving catches symlinks out of root.
        if not path.is_relative_to(root) or not path.is_file():
            raise NotFound(f"no model {name!r}: {name}.py is not in the model directory")
        return ModelConfig(path=path)

    def prepare(self, name: str, settings: ModelConfig, *, recover: bool) -> Prepared:
        """Import and build a model and its trainer (blocking: a thread at runtime)."""
        from webtorch.serve.model import load_model

        cfg = self.config
        model = load_model(name, cfg.resolve(settings.path), settings.device, cfg.weights(settings))
        trainer = None
        placement = self.placement
        if settings.train.enabled and (placement is None or placement.trains(name)):
            trainer = self._make_trainer(
                model, settings.train, cfg.state_dir(name, settings), self.metrics.train(name)
            )
            if recover:
                trainer.recover()
        return Prepared(settings, model, trainer)

    def _executor(self, prepared: Prepared) -> Executor:
        from webtorch.serve.executor import Executor

        s = prepared.settings
        model = prepared.model
        publisher = subscriber = None
        placement = self.placement
        if placement is not None and placement.trained(model.name):
            # Weights as numbered versions between the trainer worker and the others.
            from webtorch.serve.versions import Publisher, Subscriber, weights_path

            path = weights_path(placement.directory, model.name)
            if prepared.trainer is not None:
                publisher = Publisher(path, model.network)
            else:
                subscriber = Subscriber(path, model.network)
        return Executor(
            prepared.model,
            self.metrics.model(prepared.model.name),
            max_batch=s.max_batch,
            max_delay=s.max_delay,
            max_queue=s.max_queue,
            mode=s.compute,
            loop=self._loop,
            trainer=prepared.trainer,
            publisher=publisher,
            subscriber=subscriber,
        )

    def start(self, loop: asyncio.AbstractEventLoop, router: Router) -> None:
        """Serve the configured models (on the running loop)."""
        self._loop = loop
        self._router = router
        for name, prepared in self._initial.items():
            executor = self._executor(prepared)
            executor.warmup()
            self._install(name, prepared, executor)
        self._initial.clear()

    def _install(self, name: str, prepared: Prepared, executor: Executor) -> None:
        from webtorch.serve.endpoint import ModelEndpoint

        remote = None
        placement = self.placement
        if prepared.trainer is None and placement is not None and placement.trained(name):
            from webtorch.serve.train_forward import RemoteTrainer

            slot = placement.trainers[name]
            remote = RemoteTrainer(
                name,
                slot,
                str(placement.socket(slot)),
                # Each one a connection to the trainer: bounded as its queue is, and below.
                max_in_flight=min(prepared.settings.train.max_queue, 1024),
                timeout=self.config.server.limits.body_timeout,
            )
        endpoint = ModelEndpoint(prepared.model, executor, executor.stats, self.auth, remote)
        self.served[name] = Served(
            prepared.settings, prepared.model, prepared.trainer, executor, endpoint
        )
        self.endpoints[name] = endpoint
        self.failures.pop(name, None)
        router = self._router
        assert router is not None
        # Exact routes for the hot endpoints: one dict lookup, and a fixed metrics label.
        routes: list[tuple[str, Callable[[Request], HandlerResult]]] = list(
            zip(model_paths(name), (endpoint.predict, endpoint.infer), strict=True)
        )
        if endpoint.trainable:
            routes += zip(train_paths(name), (endpoint.train, endpoint.train_oip), strict=True)
        for path in (*model_paths(name), *train_paths(name)):
            router.remove(path)
        for path, handler in routes:
            router.add(Route(path, handler, path, check=endpoint.check))

    def _uninstall(self, name: str) -> Served:
        served = self.served.pop(name)
        del self.endpoints[name]
        assert self._router is not None
        for path in (*model_paths(name), *train_paths(name)):
            self._router.remove(path)
        return served

    async def load(self, name: str) -> None:
        """Load ``name``, or reload it if served; the old version drains in the background."""
        settings = self.settings_for(name)
        async with self._lock(name):
            loop = asyncio.get_running_loop()
            try:
                # Import and build off the loop: a model file may take seconds to load.
                prepared = await loop.run_in_executor(
                    None, functools.partial(self.prepare, name, settings, recover=False)
                )
            except WebTorchError as exc:
                self.failures[name] = str(exc)
                raise BadRequest(f"failed to load model {name!r}: {exc}") from None
            executor = self._executor(prepared)
            old = self.served.get(name)
            trainer = prepared.trainer
            if trainer is None:
                await loop.run_in_executor(None, executor.warmup)
                self._install(name, prepared, executor)
                if old is not None:
                    await old.executor.close()
                log.info("model %s %s", name, "reloaded" if old else "loaded")
                return
            # Training: queue on the new executor while the old one finishes and checkpoints,
            # then recover the new trainer from that checkpoint and let the queue run.
            executor.hold()
            self._install(name, prepared, executor)
            try:
                if old is not None:
                    await old.executor.close()
                await loop.run_in_executor(None, trainer.recover)
                await loop.run_in_executor(None, executor.warmup)
            except Exception as exc:
                self._uninstall(name)
                await executor.close()
                self.failures[name] = str(exc)
                raise BadRequest(f"failed to load model {name!r}: {exc}") from None
            executor.release()
            log.info("model %s %s at step %d", name, "reloaded" if old else "loaded", trainer.step)

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            if name not in self.served:
                raise NotFound(f"model {name!r} is not loaded")
            served = self._uninstall(name)
            await served.executor.close()  # in-flight requests finish; final checkpoint
            log.info("model %s unloaded", name)

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def close(self) -> None:
        for served in list(self.served.values()):
            await served.executor.close()

    # -- HTTP ------------------------------------------------------------------------------------

    def index(self) -> list[dict[str, Any]]:
        names = set(self.config.models) | set(self.served) | set(self.failures)
        model_dir = self.config.server.model_dir
        if model_dir is not None:
            root = self.config.resolve(model_dir)
            if root.is_dir():
                names |= {p.stem for p in root.glob("*.py") if MODEL_NAME.fullmatch(p.stem)}
        entries = []
        for name in sorted(names):
            served = self.served.get(name)
            if served is not None:
                entries.append(
                    {"name": name, "version": served.model.spec.version, "state": "READY"}
                )
            else:
                reason = self.failures.get(name, "not loaded")
                entries.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
        return entries

    def check(self, request: Request) -> None:
        """What refuses a ``/v2/repository/...`` request whatever its body (the Route.check
        asked before a 100 Continue, and handle's first step): off, not POST, a sender or
        content type a page elsewhere could use (load/unload), no token."""
        if not self.enabled:
            raise NotFound(
                "the model repository endpoints are off; enable them with "
                "[server] management = true"
            )
        if request.method != "POST":
            self.auth.check(request)
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}", ("POST",))
        if request.path.endswith(("/load", "/unload")):
            # Even with no body: Content-Type: application/json, which no page sends cross-site.
            self.auth.check_change(request)
        else:
            self.auth.check(request)  # the index reads only (a page elsewhere cannot read it)

    def handle(self, request: Request) -> HandlerResult:
        """``/v2/repository/...``."""
        parts = [p for p in request.path.split("/") if p]  # ["v2", "repository", ...]
        self.check(request)
        rest = parts[2:]
        if rest == ["index"]:
            request.route = "/v2/repository/index"
            return json_response(self.index())
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            request.route = f"/v2/repository/models/{{model}}/{rest[2]}"
            _check_body(request.body, unload=rest[2] == "unload")
            action = self.load if rest[2] == "load" else self.unload
            return _answer(action(rest[1]))
        raise NotFound(f"no model repository endpoint at {request.path}")


def _check_body(body: bytes, unload: bool = False) -> None:
    """Triton's load accepts ``parameters`` that carry a config or model files; WebTorch loads
    only what the operator configured or put in model_dir, so any such parameter is refused.
    Unload's ``unload_dependents`` (which tritonclient always sends) is accepted: WebTorch has
    no ensembles, so a model has no dependents to unload."""
    if not body.strip():
        return
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body must be empty or a JSON object") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be empty or a JSON object")
    params = doc.get("parameters") or {}
    if unload and isinstance(params, dict) and isinstance(params.get("unload_dependents"), bool):
        params = {k: v for k, v in params.items() if k != "unload_dependents"}
    if params:
        raise BadRequest(
            "load parameters (config overrides, model files) are not accepted: models come "
            "only from the configuration and server.model_dir"
        )


async def _answer(action: Coroutine[Any, Any, None]) -> Response:
    await action
    return Response(200, b"{}")

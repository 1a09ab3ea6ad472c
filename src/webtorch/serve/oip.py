"""HTTP endpoints of served models: the Open Inference Protocol (KServe v2) and the short form.

OIP: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{m}[/versions/{v}]``,
``.../ready`` and ``POST .../infer``. Short form: ``POST /models/{m}/predict`` and
``GET /models/{m}``. Handlers return the executor's future, so no task is created per request.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from webtorch.errors import MethodNotAllowed, NotFound
from webtorch.http.messages import HandlerResult, Request, json_response
from webtorch.observe.metrics import ModelStats
from webtorch.serve import codecs
from webtorch.serve.executor import Executor
from webtorch.serve.model import LoadedModel

SERVER_NAME = "webtorch"
EXTENSIONS = ["binary_tensor_data"]


def _require(request: Request, *methods: str) -> None:
    if request.method not in methods:
        if request.method == "HEAD" and "GET" in methods:
            return
        raise MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}; use {' or '.join(methods)}",
            methods,
        )


class ModelEndpoint:
    """One served model: decode a request, queue it on the executor, encode its outputs."""

    def __init__(self, model: LoadedModel, executor: Executor, stats: ModelStats) -> None:
        self.model = model
        self.executor = executor
        self.stats = stats
        self.name = model.name
        self.version = model.spec.version
        self._inputs = {t.name: t for t in model.inputs}
        self._outputs = model.outputs
        self._record_decode = stats.stages["decode"].record
        self._short = codecs.ShortForm(model.inputs, model.outputs, model.name)
        self._oip = codecs.OIPForm(model.inputs, model.outputs, model.name, self.version)

    def predict(self, request: Request) -> HandlerResult:
        if request.method != "POST":
            _require(request, "POST")
        t0 = time.perf_counter()
        inputs, rows = self._short.decode(request.body, request.content_type)
        self._record_decode(time.perf_counter() - t0)
        return self.executor.submit(inputs, rows, self._short.encode)

    def infer(self, request: Request) -> HandlerResult:
        if request.method != "POST":
            _require(request, "POST")
        t0 = time.perf_counter()
        decoded = self._oip.decode(
            request.body, request.content_type, request.header(b"inference-header-content-length")
        )
        self._record_decode(time.perf_counter() - t0)
        return self.executor.submit(
            decoded.inputs, decoded.rows, functools.partial(self._oip.encode, decoded)
        )

    def metadata(self) -> dict[str, Any]:
        return self.model.metadata()


class ModelRoutes:
    """The ``/v2`` and ``/models/`` prefixes, dispatching by path segments."""

    def __init__(
        self,
        endpoints: dict[str, ModelEndpoint],
        ready: Callable[[], bool],
        version: str,
    ) -> None:
        self.endpoints = endpoints
        self.ready = ready
        self.version = version

    def _endpoint(self, name: str) -> ModelEndpoint:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise NotFound(f"unknown model {name!r} (served: {known})")
        return endpoint

    def oip(self, request: Request) -> HandlerResult:
        parts = [p for p in request.path.split("/") if p]  # ["v2", ...]
        rest = parts[1:]
        if not rest:
            _require(request, "GET")
            return json_response(
                {"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS}
            )
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _require(request, "GET")
            request.route = f"/v2/health/{rest[1]}"
            if rest[1] == "live":
                return json_response({"live": True})
            ready = self.ready()
            return json_response({"ready": ready}, 200 if ready else 503)
        if rest[0] == "models" and len(rest) >= 2:
            endpoint = self._endpoint(rest[1])
            tail = rest[2:]
            if len(tail) >= 2 and tail[0] == "versions":
                if tail[1] != endpoint.version:
                    raise NotFound(
                        f"model {endpoint.name!r} has no version {tail[1]!r} "
                        f"(versions: {endpoint.version})"
                    )
                tail = tail[2:]
            if not tail:
                _require(request, "GET")
                request.route = f"/v2/models/{endpoint.name}"
                return json_response(endpoint.metadata())
            if tail == ["ready"]:
                _require(request, "GET")
                request.route = f"/v2/models/{endpoint.name}/ready"
                ready = self.ready()
                return json_response({"name": endpoint.name, "ready": ready}, 200 if ready else 503)
            if tail == ["infer"]:
                request.route = f"/v2/models/{endpoint.name}/infer"
                return endpoint.infer(request)
        raise NotFound(f"no Open Inference Protocol endpoint at {request.path}")

    def short(self, request: Request) -> HandlerResult:
        parts = [p for p in request.path.split("/") if p]  # ["models", name, ...]
        if len(parts) >= 2:
            endpoint = self._endpoint(parts[1])
            if len(parts) == 2:
                _require(request, "GET")
                request.route = f"/models/{endpoint.name}"
                return json_response(endpoint.metadata())
            if parts[2:] == ["predict"]:
                request.route = f"/models/{endpoint.name}/predict"
                return endpoint.predict(request)
        raise NotFound(f"no model endpoint at {request.path}; try POST /models/<name>/predict")

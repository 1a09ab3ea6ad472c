"""HTTP endpoints of served models: the Open Inference Protocol (KServe v2) and the short form.

OIP: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{m}[/versions/{v}]``,
``.../ready``, ``POST .../infer`` and WebTorch's extension ``POST .../train``. Short form:
``POST /models/{m}/predict``, ``POST /models/{m}/train`` and ``GET /models/{m}[/train]``.
Handlers return the executor's Pending, so no task is created per request. Each model's own
endpoint is in ``endpoint.py``; this module routes to them and needs no torch, so a server
without models never loads it.

Training changes the model, so its endpoints need the server's bearer token when one is configured
(``config.py`` refuses to expose training beyond loopback without one).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from webtorch.errors import MethodNotAllowed, NotFound, Unauthorized
from webtorch.http.messages import HandlerResult, Request, json_response

if TYPE_CHECKING:
    # One served model's endpoint (endpoint.py) brings torch; routing to it does not.
    from webtorch.serve.endpoint import ModelEndpoint

SERVER_NAME: Final = "webtorch"
EXTENSIONS: Final = ["binary_tensor_data", "train"]


class Auth:
    """The bearer-token check of training and management endpoints (none: open)."""

    def __init__(self, token: str | None) -> None:
        self._expected = None if token is None else b"Bearer " + token.encode()

    def valid(self, request: Request) -> bool:
        """Whether the request bears the token (False when none is configured)."""
        given = request.header(b"authorization")
        expected = self._expected
        return expected is not None and given is not None and hmac.compare_digest(given, expected)

    def check(self, request: Request) -> None:
        if self._expected is None:
            return
        given = request.header(b"authorization")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if given is None or not hmac.compare_digest(given, self._expected):
            raise Unauthorized(
                "this endpoint needs `Authorization: Bearer <token>` with the server's token"
                if given is None
                else "invalid bearer token",
                headers=[(b"www-authenticate", b'Bearer realm="webtorch"')],
            )


def require_method(request: Request, *methods: str) -> None:
    if request.method not in methods:
        if request.method == "HEAD" and "GET" in methods:
            return
        raise MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}; use {' or '.join(methods)}",
            methods,
        )


class ModelRoutes:
    """The ``/v2`` and ``/models/`` prefixes, dispatching by path segments."""

    def __init__(
        self,
        endpoints: dict[str, ModelEndpoint],
        ready: Callable[[], bool],
        version: str,
        extensions: list[str] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.ready = ready
        self.version = version
        self.extensions = extensions if extensions is not None else EXTENSIONS

    def _endpoint(self, name: str) -> ModelEndpoint:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise NotFound(f"unknown model {name!r} (served: {known})")
        return endpoint

    def check(self, request: Request) -> None:
        """Route.check of the /v2/ and /models/ prefixes (a served model's predict, infer and
        train paths have exact routes, checked by their endpoint): an unknown model, or a body
        endpoint reached by another path (/v2/models/{m}/versions/{v}/train), is refused before
        the body is read."""
        parts = [p for p in request.path.split("/") if p]
        if parts[:1] == ["v2"]:
            parts = parts[1:]
        if len(parts) >= 2 and parts[0] == "models":
            endpoint = self._endpoint(parts[1])
            if parts[-1] in ("infer", "predict", "train") and len(parts) > 2:
                endpoint.check(request)

    def oip(self, request: Request) -> HandlerResult:
        parts = [p for p in request.path.split("/") if p]  # ["v2", ...]
        rest = parts[1:]
        if not rest:
            require_method(request, "GET")
            return json_response(
                {"name": SERVER_NAME, "version": self.version, "extensions": self.extensions}
            )
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            require_method(request, "GET")
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
                require_method(request, "GET")
                request.route = f"/v2/models/{endpoint.name}"
                return json_response(endpoint.metadata())
            if tail == ["ready"]:
                require_method(request, "GET")
                request.route = f"/v2/models/{endpoint.name}/ready"
                ready = self.ready()
                return json_response({"name": endpoint.name, "ready": ready}, 200 if ready else 503)
            if tail == ["infer"]:
                request.route = f"/v2/models/{endpoint.name}/infer"
                return endpoint.infer(request)
            if tail == ["train"]:
                request.route = f"/v2/models/{endpoint.name}/train"
                return endpoint.train_oip(request)
        raise NotFound(f"no Open Inference Protocol endpoint at {request.path}")

    def short(self, request: Request) -> HandlerResult:
        parts = [p for p in request.path.split("/") if p]  # ["models", name, ...]
        if len(parts) >= 2:
            endpoint = self._endpoint(parts[1])
            if len(parts) == 2:
                require_method(request, "GET")
                request.route = f"/models/{endpoint.name}"
                return json_response(endpoint.metadata())
            if parts[2:] == ["predict"]:
                request.route = f"/models/{endpoint.name}/predict"
                return endpoint.predict(request)
            if parts[2:] == ["train"]:
                request.route = f"/models/{endpoint.name}/train"
                return endpoint.train(request)
        raise NotFound(f"no model endpoint at {request.path}; try POST /models/<name>/predict")

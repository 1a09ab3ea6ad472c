"""HTTP endpoints of served models: the Open Inference Protocol (KServe v2) and the short form.

OIP: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{m}[/versions/{v}]``,
``.../ready``, ``POST .../infer`` and WebTorch's extension ``POST .../train``. Short form:
``POST /models/{m}/predict``, ``POST /models/{m}/train`` and ``GET /models/{m}[/train]``.
Handlers return the executor's Pending, so no task is created per request. Each model's own
endpoint is in ``endpoint.py``; this module routes to them and needs no torch, so a server
without models never loads it.

Training changes the model, so its endpoints need the server's bearer token when one is configured
(``config.py`` refuses to expose training beyond loopback without one), and, token or not, refuse
what a web page could send cross-site (:meth:`Auth.check_change`: CSRF).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from webtorch.errors import (
    Forbidden,
    MethodNotAllowed,
    NotFound,
    Unauthorized,
    UnsupportedMediaType,
)
from webtorch.http.messages import JSON, HandlerResult, Request, json_response

if TYPE_CHECKING:
    # One served model's endpoint (endpoint.py) brings torch; routing to it does not.
    from webtorch.serve.endpoint import ModelEndpoint

SERVER_NAME: Final = "webtorch"
EXTENSIONS: Final = ["binary_tensor_data", "train"]


# The media types a state-changing request may carry. A web page can send cross-site, with no
# CORS preflight, only text/plain, application/x-www-form-urlencoded, multipart/form-data or no
# Content-Type at all (fetch's no-cors mode, a <form>); anything else needs a preflight, which
# WebTorch never grants (it sends no Access-Control-Allow-* header). So a request that trains,
# loads, unloads or reloads must say JSON (application/json, */*+json) or binary tensor data.
_CHANGE_TYPES: Final = frozenset({JSON, b"application/octet-stream"})
_CHANGE_HINT: Final = (
    "send Content-Type: application/json (also for an empty body), or application/octet-stream "
    "with Inference-Header-Content-Length"
)
# Inference-Header-Content-Length is no CORS-safelisted header either: a request bearing it was
# preflighted (or not sent by a browser), whatever its Content-Type says.
_BINARY_HEADER: Final = b"inference-header-content-length"


class Auth:
    """The checks of training and management endpoints: the bearer token (none: open) and, for
    requests that change state, that no web page could have sent them cross-site (CSRF).
    :meth:`configure` swaps the settings in place, so a reload reaches every holder."""

    def __init__(self, token: str | None, allowed_origins: Iterable[str] = ()) -> None:
        self.token: bytes | None = None
        self._expected: bytes | None = None
        self._origins: frozenset[bytes] = frozenset()
        self.configure(token, allowed_origins)

    def configure(self, token: str | None, allowed_origins: Iterable[str] = ()) -> None:
        self.token = None if token is None else token.encode()
        self._expected = None if self.token is None else b"Bearer " + self.token
        # config.py normalises them: lower-case scheme://host[:port], no trailing slash.
        self._origins = frozenset(origin.encode() for origin in allowed_origins)

    def valid(self, request: Request) -> bool:
        """Whether the request bears the token (False when none is configured)."""
        given = request.header(b"authorization")
        expected = self._expected
        return expected is not None and given is not None and hmac.compare_digest(given, expected)

    def check(self, request: Request) -> None:
        expected = self._expected
        if expected is None:
            return
        given = request.header(b"authorization")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if given is None or not hmac.compare_digest(given, expected):
            raise Unauthorized(
                "this endpoint needs `Authorization: Bearer <token>` with the server's token"
                if given is None
                else "invalid bearer token",
                headers=[(b"www-authenticate", b'Bearer realm="webtorch"')],
            )

    def check_change(self, request: Request) -> None:
        """A state-changing request's checks, token or not: a content type no page can send
        cross-site without a preflight (415), a same-origin or non-browser sender (403), then
        the token (401). Cheap: one pass over the headers."""
        content_type = request.content_type
        origin: bytes | None = None
        site: bytes | None = None
        binary = False
        for key, value in request.headers:
            if key == b"origin":
                origin = value
            elif key == b"sec-fetch-site":
                site = value
            elif key == _BINARY_HEADER:
                binary = True
        if not (content_type in _CHANGE_TYPES or content_type.endswith(b"+json") or binary):
            shown = (
                f"the content type {content_type[:100].decode('latin-1')!r}"
                if content_type
                else "a request without Content-Type"
            )
            raise UnsupportedMediaType(
                f"{request.path} changes the server's state and does not accept {shown} (a web "
                f"page could send that cross-site); {_CHANGE_HINT}"
            )
        if origin is not None or site is not None:
            self._check_sender(request, origin, site)
        self.check(request)

    def check_sender(self, request: Request) -> None:
        """The sender check of :meth:`check_change` alone, for what has no content type to
        check (a WebSocket that sends labels: streams/models.py)."""
        origin, site = request.header(b"origin"), request.header(b"sec-fetch-site")
        if origin is not None or site is not None:
            self._check_sender(request, origin, site)

    def _check_sender(self, request: Request, origin: bytes | None, site: bytes | None) -> None:
        """Browsers say where a request comes from: ``Origin`` (sent with every cross-origin
        POST) and ``Sec-Fetch-Site``. Other clients send neither and pass."""
        if origin is not None:
            if origin.lower() in self._origins:
                return  # listed in server.allowed_origins: trusted even from another site
            host = request.header(b"host")
            authority = origin.partition(b"://")[2]
            if host is not None and authority and authority.lower() == host.lower():
                if _literal_host(host):
                    return  # the server's own page
                # A DNS name can be rebound to 127.0.0.1 by whoever owns it: its pages would be
                # "same-origin" with a loopback server that has no token.
                raise Forbidden(
                    f"Origin {origin[:100].decode('latin-1')!r} names this server by a DNS name "
                    "(DNS rebinding is possible): list it in server.allowed_origins to let its "
                    "pages change state here"
                )
            raise Forbidden(
                f"Origin {origin[:100].decode('latin-1')!r} is not this server "
                f"(Host {(host or b'')[:100].decode('latin-1')!r}) and not in "
                "server.allowed_origins: a page elsewhere may not change state here"
            )
        if site not in (b"same-origin", b"none"):
            raise Forbidden(
                f"Sec-Fetch-Site: {(site or b'')[:40].decode('latin-1')} and no Origin from "
                "server.allowed_origins: a page elsewhere may not change state here"
            )


def _literal_host(host: bytes) -> bool:
    """Whether a Host names the server by an IP address or ``localhost``: names no one else can
    point elsewhere (not a DNS name, which its owner can rebind)."""
    if host.startswith(b"["):
        return True  # an IPv6 literal
    name = host.rpartition(b":")[0] if b":" in host else host
    name = name.lower()
    return name == b"localhost" or (bool(name) and not name.strip(b"0123456789."))


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

"""Routes: exact paths first, then the longest matching prefix (nginx's ``location`` order)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from webtorch.errors import NotFound
from webtorch.http.messages import Handler, HandlerResult, Request


@dataclass(frozen=True, slots=True)
class Route:
    """``path`` is exact unless ``prefix`` is set; ``name`` labels the route in metrics.

    A ``stream`` route gets requests with a body as soon as their headers are in, the body
    following as ``Request.stream`` (a proxy forwards it as it comes); ``max_body`` is then its
    own size limit. ``user`` marks a route from the config's [[routes]], replaced on reload.

    ``check`` sees a request before its body is read, when the client waits for ``100
    Continue`` to send it (RFC 9110 10.1.1), and raises the HTTPError its handler would refuse
    it with without reading the body (a missing token, a wrong method, an unknown model): the
    client then gets that answer instead of an invitation to upload.
    """

    path: str
    handler: Handler
    name: str
    prefix: bool = False
    stream: bool = False
    max_body: int | None = None
    user: bool = False
    check: Callable[[Request], None] | None = None


class Router:
    def __init__(self, routes: list[Route] | None = None) -> None:
        self._exact: dict[str, Route] = {}
        self._prefixes: list[Route] = []
        for route in routes or []:
            self.add(route)

    def add(self, route: Route) -> None:
        if route.prefix:
            if any(r.path == route.path for r in self._prefixes):
                raise ValueError(f"duplicate route prefix {route.path!r}")
            self._prefixes.append(route)
            self._prefixes.sort(key=lambda r: len(r.path), reverse=True)
        else:
            if route.path in self._exact:
                raise ValueError(f"duplicate route path {route.path!r}")
            self._exact[route.path] = route

    def replace_user_routes(self, routes: list[Route]) -> None:
        """Swap the config's routes for ``routes`` in one step (a reload): a request is routed
        by the old set or the new one, never by a mix or by none."""
        exact = {p: r for p, r in self._exact.items() if not r.user}
        prefixes = [r for r in self._prefixes if not r.user]
        for route in routes:
            taken = (
                any(r.path == route.path for r in prefixes)
                if route.prefix
                else (route.path in exact)
            )
            if taken:
                kind = "prefix" if route.prefix else "path"
                raise ValueError(f"duplicate route {kind} {route.path!r}")
            if route.prefix:
                prefixes.append(route)
            else:
                exact[route.path] = route
        prefixes.sort(key=lambda r: len(r.path), reverse=True)
        self._exact, self._prefixes = exact, prefixes

    def match_stream(self, path: str) -> Route | None:
        """The route for ``path`` if it streams request bodies (see :class:`Route`)."""
        route = self.match(path)
        return route if route is not None and route.stream else None

    def remove(self, path: str) -> None:
        """Forget the exact route at ``path``, if any (a model unloaded or about to be replaced)."""
        self._exact.pop(path, None)

    def precheck(self, request: Request) -> None:
        """Refuse ``request`` before its body is read, as it would be after: no route is a 404,
        and the route's ``check`` raises what else would (see :class:`Route`)."""
        route = self.match(request.path)
        if route is None:
            raise NotFound(f"no route for {request.path}")
        if route.check is not None:
            route.check(request)

    def match(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        for candidate in self._prefixes:
            if path.startswith(candidate.path):
                return candidate
        return None

    def __call__(self, request: Request) -> HandlerResult:
        route = self.match(request.path)
        if route is None:
            request.route = "unmatched"
            raise NotFound(f"no route for {request.path}")
        request.route = route.name
        return route.handler(request)

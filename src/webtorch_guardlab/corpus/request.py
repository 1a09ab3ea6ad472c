"""Requests under construction, the clients that send them, and how both become bytes.

Benign traffic and injected attacks are built the same way: a session script makes a
:class:`Req` (path, query pairs, cookies, a typed body), the injector may change one field of it,
and :func:`render` turns it into a method, target, headers and body with the encoding habits of
the sending :class:`Client` (a browser form encodes spaces as ``+``, an app's HTTP library as
``%20``...). Attack and benign requests share the renderer and the client population, so the
encoding, header order, user agent and address are never what tells them apart.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from webtorch_guardlab.corpus.records import Headers

HOST = "www.shop.example"

# ~20 current browser user agents, plus the shop's own app and the polite crawlers. Attackers
# draw from the same table with the same weights (see Population).
BROWSER_UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 OPR/115.0.0.0",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
    "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
)
# Programmatic clients: the shop's app and the integrations' HTTP libraries.
APP_UAS = (
    "ShopApp/5.3.1 (iPhone; iOS 18.1; Scale/3.00)",
    "python-requests/2.32.3",
    "curl/8.5.0",
    "ShopApp/5.3.0 (Linux; U; Android 14; Pixel 8 Build/AP2A.240905.003) okhttp/4.12.0",
    "ShopApp/5.2.7 (Linux; U; Android 13; SM-A536B Build/TP1A.220624.014) okhttp/4.12.0",
)
CRAWLER_UAS = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
)
LANGS = (
    "en-US,en;q=0.9",
    "en-GB,en;q=0.9",
    "de-DE,de;q=0.9,en;q=0.8",
    "fr-FR,fr;q=0.9,en-US;q=0.8,en;q=0.7",
    "es-ES,es;q=0.9",
    "ja-JP,ja;q=0.9,en;q=0.8",
    "zh-CN,zh;q=0.9",
    "pt-BR,pt;q=0.9,en;q=0.8",
    "ru-RU,ru;q=0.9,en;q=0.8",
    "ar,en;q=0.8",
)
KINDS = ("browser", "app", "crawler")


@dataclass(frozen=True, slots=True)
class Client:
    """One user agent on one address; several may share an address (NAT)."""

    ip: str
    ua: str
    kind: str  # browser | app | crawler
    lang: str
    session: str  # session cookie value once logged in / first visit
    referer: bool = True  # False: a browser set to send no Referer (privacy settings)

    @property
    def engine(self) -> str:
        """Which multipart boundary style and header habits the agent has."""
        if self.kind != "browser":
            return self.kind  # app | crawler
        if "Firefox" in self.ua:
            return "firefox"
        if "Chrome" in self.ua or "CriOS" in self.ua:
            return "chrome"
        return "safari"


class IpAllocator:
    """Unique client addresses from one distribution for every label and split: mostly IPv4 from
    public unicast space, some IPv6. Uniqueness keeps train and test clients disjoint."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def new(self) -> str:
        while True:
            ip = self._draw()
            if ip not in self._used:
                self._used.add(ip)
                return ip

    def _draw(self) -> str:
        r = self._rng
        if r.random() < 0.15:
            groups = [f"{r.choice((0x2001, 0x2600, 0x2A00, 0x2A02, 0x2804)):x}"]
            groups += [f"{r.randrange(0x10000):x}" for _ in range(7)]
            return ":".join(groups)
        while True:
            a = r.randint(1, 223)
            if a in (10, 100, 127, 169, 172, 192, 198, 203):
                continue  # private, shared, loopback, link-local, test ranges
            return f"{a}.{r.randrange(256)}.{r.randrange(256)}.{r.randint(1, 254)}"


def new_client(
    rng: random.Random, ip: str, kind: str | None = None, *, weights: tuple[float, ...] = ()
) -> Client:
    """A client of ``kind`` (drawn by ``weights`` over :data:`KINDS` when None)."""
    if kind is None:
        kind = rng.choices(KINDS, weights=weights or (0.88, 0.1, 0.02))[0]
    if kind == "app":
        ua = rng.choice(APP_UAS)
    elif kind == "crawler":
        ua = rng.choice(CRAWLER_UAS)
    else:
        ua = rng.choice(BROWSER_UAS)
    lang = rng.choices(LANGS, weights=(30, 10, 8, 6, 5, 4, 4, 4, 3, 2))[0]
    session = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))
    referer = kind == "browser" and rng.random() >= 0.06
    return Client(ip=ip, ua=ua, kind=kind, lang=lang, session=session, referer=referer)


@dataclass(slots=True)
class Part:
    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass(slots=True)
class Req:
    """A request being built: fields are edited in place by scripts and the injector."""

    method: str
    path: str
    route: str
    query: list[tuple[str, str]] = field(default_factory=list)
    cookies: list[tuple[str, str]] = field(default_factory=list)
    referer: str | None = None
    accept: str = "html"  # html | css | js | image | json | any
    body_kind: str = ""  # "" | form | json | multipart | xml
    form: list[tuple[str, str]] = field(default_factory=list)
    json_body: Any = None
    parts: list[Part] = field(default_factory=list)
    xml: str = ""
    extra: list[tuple[str, str]] = field(default_factory=list)  # extra headers (If-None-Match)
    raw_query: str = ""  # appended verbatim (prototype-pollution query strings)
    ua: str | None = None  # replaces the client's User-Agent (header injection)

    def copy(self) -> Req:
        return Req(
            method=self.method,
            path=self.path,
            route=self.route,
            query=list(self.query),
            cookies=list(self.cookies),
            referer=self.referer,
            accept=self.accept,
            body_kind=self.body_kind,
            form=list(self.form),
            json_body=json.loads(json.dumps(self.json_body)) if self.json_body else None,
            parts=[Part(p.name, p.value, p.filename, p.content_type) for p in self.parts],
            xml=self.xml,
            extra=list(self.extra),
            raw_query=self.raw_query,
            ua=self.ua,
        )


# --- encoding ----------------------------------------------------------------------------------

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# characters a browser leaves alone in a query value (beyond alphanumerics and "_.-~")
_BROWSER_SAFE = "!'()*,/:@"
_APP_SAFE = "!$'()*,/:;@"
_COOKIE_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"


def pct(text: str, safe: str, *, plus: bool = False) -> str:
    """Percent-encodes ``text`` as UTF-8, keeping ``safe`` and any ``%XX`` escape already there
    (lists hold pre-encoded payloads that must reach the server as written)."""
    out = []
    pos = 0
    for m in _ESCAPE.finditer(text):
        out.append(_pct(text[pos : m.start()], safe, plus))
        out.append(m.group(0))
        pos = m.end()
    out.append(_pct(text[pos:], safe, plus))
    return "".join(out)


def _pct(s: str, safe: str, plus: bool) -> str:
    if plus:
        return "+".join(quote(part, safe=safe) for part in s.split(" "))
    return quote(s, safe=safe)


def header_value(text: str) -> str:
    """A value safe on a header line: printable ASCII kept, the rest percent-encoded."""
    return "".join(
        c if 0x20 <= ord(c) < 0x7F else "".join(f"%{b:02X}" for b in c.encode()) for c in text
    )


def encode_query(pairs: list[tuple[str, str]], engine: str) -> str:
    plus = engine != "app"
    safe = _APP_SAFE if engine == "app" else _BROWSER_SAFE
    return "&".join(f"{pct(k, safe, plus=plus)}={pct(v, safe, plus=plus)}" for k, v in pairs)


def encode_form(pairs: list[tuple[str, str]]) -> str:
    # application/x-www-form-urlencoded: every engine uses "+" and encodes nearly everything
    return "&".join(f"{pct(k, '*', plus=True)}={pct(v, '*', plus=True)}" for k, v in pairs)


def encode_path(path: str) -> str:
    return pct(path, "/!$&'()*+,;=:@~")


_ACCEPT = {
    "html": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "css": "text/css,*/*;q=0.1",
    "js": "*/*",
    "image": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
    "json": "application/json",
    "any": "*/*",
}


def _boundary(engine: str, rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    if engine == "firefox":
        return "-" * 27 + "".join(rng.choice(string.digits) for _ in range(30))
    if engine in ("chrome", "safari"):
        return "----WebKitFormBoundary" + "".join(rng.choice(alnum) for _ in range(16))
    return "".join(rng.choice("0123456789abcdef-") for _ in range(36))


def _multipart(parts: list[Part], boundary: str) -> bytes:
    out = bytearray()
    for p in parts:
        out += f"--{boundary}\r\n".encode()
        disp = f'Content-Disposition: form-data; name="{header_value(p.name)}"'
        if p.filename is not None:
            disp += f'; filename="{header_value(p.filename)}"'
        out += disp.encode() + b"\r\n"
        if p.content_type:
            out += f"Content-Type: {p.content_type}\r\n".encode()
        out += b"\r\n" + p.value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def render(req: Req, client: Client, rng: random.Random) -> tuple[str, Headers, bytes]:
    """(target, headers in wire order, body) as ``client`` would send ``req``."""
    engine = client.engine
    target = encode_path(req.path)
    q = encode_query(req.query, engine) if req.query else ""
    if req.raw_query:
        raw = pct(req.raw_query, "=&[]" + (_APP_SAFE if engine == "app" else _BROWSER_SAFE))
        q = f"{q}&{raw}" if q else raw
    if q:
        target += "?" + q
    body = b""
    ctype = None
    if req.body_kind == "form":
        body = encode_form(req.form).encode("ascii")
        ctype = "application/x-www-form-urlencoded"
    elif req.body_kind == "json":
        body = json.dumps(req.json_body, ensure_ascii=False, separators=(",", ":")).encode()
        ctype = "application/json"
    elif req.body_kind == "multipart":
        b = _boundary(engine, rng)
        body = _multipart(req.parts, b)
        ctype = f"multipart/form-data; boundary={b}"
    elif req.body_kind == "xml":
        body = req.xml.encode()
        ctype = "application/xml"
    h: list[tuple[str, str]] = [("Host", HOST)]
    if engine not in ("app", "crawler"):
        h.append(("Connection", "keep-alive"))
    h.append(("User-Agent", header_value(req.ua if req.ua is not None else client.ua)))
    if engine == "crawler":
        h.append(("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"))
    else:
        h.append(("Accept", _ACCEPT["json" if engine == "app" else req.accept]))
        h.append(("Accept-Language", client.lang))
    h.append(("Accept-Encoding", "gzip" if engine == "app" else "gzip, deflate, br"))
    if ctype is not None:
        h.append(("Content-Type", ctype))
        h.append(("Content-Length", str(len(body))))
    if req.method in ("POST", "PUT", "DELETE") and client.kind == "browser" and req.body_kind:
        h.append(("Origin", f"https://{HOST}"))
    if req.referer and (client.referer or client.kind != "browser"):
        h.append(("Referer", header_value(req.referer)))
    h.extend((k, header_value(v)) for k, v in req.extra)
    if req.cookies:
        h.append(("Cookie", "; ".join(f"{k}={pct(v, _COOKIE_SAFE)}" for k, v in req.cookies)))
    return target, tuple(h), body

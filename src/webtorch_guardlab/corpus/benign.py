"""Benign traffic: a small shop-and-news site of ~40 routes and scripted sessions of its users.

The site (:data:`ROUTES`) has static assets, a news section whose paths come from the real access
log that Debian's ``logstalgia`` ships (``/usr/share/logstalgia/example.log``, 3,260 lines), a
shop (search, categories, products, reviews, cart, checkout), accounts (login, register,
profile), comments and a contact form, a JSON API, uploads, an XML import and a webhook
endpoint.

Sessions are scripts per intent (shop, news, account, reader, app, integrator), with log-normal
think times, sub-resource bursts after page loads, cookies and referers as a browser sends them.
When the logstalgia log is present, news sessions replay its visitors' request sequences with
their own timing; without it, synthetic news sessions stand in.

Hard cases, all benign: names like O'Brien, text with SQL and HTML words ("select a union rep"),
long queries and comments, non-Latin scripts and emoji, passwords full of punctuation, uploads,
XML with a DOCTYPE, a polite crawler that reads robots.txt, a flash crowd, many users behind one
NAT address. Each sample's ``source`` names its scenario (``benign/shop``, ``benign/nat``...).
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from webtorch_guardlab.corpus.content import (
    CATEGORIES,
    EXTERNAL_REFERERS,
    FILES,
    HARD_QUERIES,
    NAMES,
    NEWS_SECTIONS,
    OUTBOUND,
    QUERIES,
    ROBOTS_DISALLOW,
    SLUGS,
    STREETS,
    UNICODE_QUERIES,
    email_for,
    image_bytes,
    long_text,
    password,
    search_query,
    sentences,
)
from webtorch_guardlab.corpus.request import (
    HOST,
    Client,
    IpAllocator,
    Part,
    Req,
    encode_path,
    encode_query,
    new_client,
)

LOGSTALGIA_LOG = Path("/usr/share/logstalgia/example.log")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    method: str
    template: str  # path with {placeholders}
    kind: str  # static | page | form | api | upload | xml


ROUTES = (
    Route("home", "GET", "/", "page"),
    Route("css", "GET", "/static/css/{name}.css", "static"),
    Route("js", "GET", "/static/js/{name}.js", "static"),
    Route("img", "GET", "/static/img/{name}", "static"),
    Route("favicon", "GET", "/favicon.ico", "static"),
    Route("robots", "GET", "/robots.txt", "static"),
    Route("sitemap", "GET", "/sitemap.xml", "static"),
    Route("photo", "GET", "/images/{dir}/{name}", "static"),
    Route("legacy_asset", "GET", "/{styles_or_js}/{name}", "static"),
    Route("news", "GET", "/news.html", "page"),
    Route("faq", "GET", "/faq.html", "page"),
    Route("latest", "GET", "/latest.php", "page"),
    Route("stories", "GET", "/stories.php", "page"),
    Route("story", "GET", "/stories/{section}/{year}/{id}.htm", "page"),
    Route("gallery", "GET", "/gallery.php", "page"),
    Route("adclick", "GET", "/adclick.php", "page"),
    Route("search", "GET", "/search", "page"),
    Route("category", "GET", "/products", "page"),
    Route("product", "GET", "/products/{id}", "page"),
    Route("reviews", "GET", "/products/{id}/reviews", "page"),
    Route("blog", "GET", "/blog/{slug}", "page"),
    Route("login_page", "GET", "/login", "page"),
    Route("login", "POST", "/login", "form"),
    Route("register", "POST", "/register", "form"),
    Route("logout", "POST", "/logout", "form"),
    Route("account", "GET", "/account", "page"),
    Route("profile", "POST", "/account/profile", "form"),
    Route("comment", "POST", "/comments", "form"),
    Route("cart", "GET", "/cart", "page"),
    Route("cart_add", "POST", "/cart/items", "form"),
    Route("checkout", "POST", "/checkout", "form"),
    Route("contact", "POST", "/contact", "form"),
    Route("download", "GET", "/download", "page"),
    Route("go", "GET", "/go", "page"),
    Route("api_products", "GET", "/api/v1/products", "api"),
    Route("api_product", "GET", "/api/v1/products/{id}", "api"),
    Route("api_order", "POST", "/api/v1/orders", "api"),
    Route("api_user", "PUT", "/api/v1/users/{id}", "api"),
    Route("api_cart_delete", "DELETE", "/api/v1/cart/items/{id}", "api"),
    Route("api_upload", "POST", "/api/v1/upload", "upload"),
    Route("api_import", "POST", "/api/v1/import", "xml"),
    Route("api_webhook", "POST", "/api/v1/webhooks", "api"),
)
ROUTE_NAMES = frozenset(r.name for r in ROUTES)
# First path segments the site serves: a scanner's request for one of them is no probe.
APP_SEGMENTS = frozenset(
    {
        "",
        "static",
        "favicon.ico",
        "robots.txt",
        "sitemap.xml",
        "images",
        "styles",
        "js",
        "news.html",
        "faq.html",
        "latest.php",
        "stories.php",
        "stories",
        "gallery.php",
        "adclick.php",
        "search",
        "products",
        "blog",
        "login",
        "register",
        "logout",
        "account",
        "comments",
        "cart",
        "checkout",
        "contact",
        "download",
        "go",
        "api",
    }
)

# --- access log --------------------------------------------------------------------------------

_LOG_LINE = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+) [^"]*" (\d{3}) \S+ "([^"]*)"')


@dataclass(frozen=True, slots=True)
class LogHit:
    host: str
    t: float
    method: str
    path: str
    status: int


def read_access_log(text: str) -> list[LogHit]:
    """Combined-format access log lines → hits (unparseable lines skipped)."""
    hits = []
    t0: float | None = None
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        try:
            ts = datetime.strptime(m.group(2), "%d/%b/%Y:%H:%M:%S %z").timestamp()
        except ValueError:
            continue
        if t0 is None:
            t0 = ts
        hits.append(LogHit(m.group(1), ts - t0, m.group(3), m.group(4), int(m.group(5))))
    return hits


def load_access_log(path: Path | None = LOGSTALGIA_LOG) -> list[LogHit]:
    """The logstalgia example log's hits, or [] when it is not installed."""
    if path is None or not path.is_file():
        return []
    return read_access_log(path.read_text(encoding="latin-1"))


def log_visits(hits: Iterable[LogHit]) -> list[list[LogHit]]:
    """Per host, its hits in order; hosts with fewer than 3 hits are left out."""
    by: dict[str, list[LogHit]] = {}
    for h in hits:
        if h.method in ("GET", "HEAD"):
            by.setdefault(h.host, []).append(h)
    return [v for _, v in sorted(by.items()) if len(v) >= 3]


# --- sessions ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Hit:
    t: float
    client: Client
    req: Req
    scenario: str


def url_of(req: Req, client: Client) -> str:
    q = encode_query(req.query, client.engine) if req.query else ""
    return f"https://{HOST}{encode_path(req.path)}" + (f"?{q}" if q else "")


def _accept_for(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if ext in ("jpg", "jpeg", "gif", "png", "ico", "webp", "svg"):
        return "image"
    if ext == "css":
        return "css"
    if ext == "js":
        return "js"
    return "html"


@dataclass
class Session:
    """One user's visit: a clock, cookies, cache and the last page (for Referer)."""

    client: Client
    rng: random.Random
    t: float
    scenario: str
    hits: list[Hit] = field(default_factory=list)
    cookies: list[tuple[str, str]] = field(default_factory=list)
    cached: set[str] = field(default_factory=set)
    last_page: str | None = None
    think_median: float = 7.0
    token: str = ""

    def send(self, req: Req, *, gap: float = 0.0) -> Req:
        self.t += gap
        if self.client.kind == "browser" and not req.cookies:
            req.cookies = list(self.cookies)
        if self.client.kind == "app":
            if not self.token:
                alnum = string.ascii_letters + string.digits
                self.token = "".join(self.rng.choice(alnum) for _ in range(40))
            req.extra.append(("Authorization", f"Bearer {self.token}"))
        if req.referer is None and self.client.kind == "browser" and req.route != "robots":
            req.referer = self.last_page
        self.hits.append(Hit(self.t, self.client, req, self.scenario))
        return req

    def think(self, median: float | None = None) -> None:
        med = median if median is not None else self.think_median
        self.t += min(600.0, max(0.3, self.rng.lognormvariate(math.log(med), 1.0)))

    def page(self, req: Req) -> None:
        """A page and, in a browser, the assets it pulls in; then the user reads."""
        self.send(req)
        if self.client.kind == "browser":
            if not self.cookies:
                self._first_cookies()
            page_url = url_of(req, self.client)
            assets = [
                Req("GET", "/static/css/site.css", "css", accept="css"),
                Req("GET", "/static/js/app.js", "js", accept="js"),
                Req("GET", "/static/img/logo.svg", "img", accept="image"),
                Req("GET", "/favicon.ico", "favicon", accept="image"),
            ]
            if req.route in ("product", "category", "search", "home"):
                for _ in range(self.rng.randint(1, 6)):
                    name = f"{self.rng.randint(100, 6000)}.jpg"
                    assets.append(Req("GET", f"/images/photos/{name}", "photo", accept="image"))
            for a in assets:
                if a.path in self.cached:
                    continue
                self.cached.add(a.path)
                a.referer = page_url
                self.send(a, gap=self.rng.uniform(0.01, 0.25))
            self.last_page = page_url
        self.think()

    def _first_cookies(self) -> None:
        r = self.rng
        self.cookies = [("sid", self.client.session)]
        if r.random() < 0.7:
            self.cookies.append(("consent", r.choice(("all", "necessary", "1"))))
        if r.random() < 0.6:
            ga = f"GA1.1.{r.randint(10**8, 10**9)}.{r.randint(1_700_000_000, 1_740_000_000)}"
            self.cookies.append(("_ga", ga))
        if r.random() < 0.2:
            self.cookies.append(("lang", self.client.lang[:2]))

    def csrf(self) -> str:
        return "".join(self.rng.choice(string.ascii_letters + string.digits) for _ in range(40))


# --- request makers (one per route; the injector uses them for base requests) ------------------


def make(route: str, s: Session) -> Req:
    """A benign request to ``route`` in session ``s`` (no side effect on the session)."""
    r = s.rng
    pid = str(r.choice((r.randint(1, 60), r.randint(1, 500))))
    if route == "home":
        return Req("GET", "/", route)
    if route == "search":
        q = [("q", search_query(r))]
        if r.random() < 0.3:
            q.append(("page", str(r.randint(2, 6))))
        if r.random() < 0.2:
            q.append(("sort", r.choice(("price_asc", "price_desc", "rating", "new"))))
        return Req("GET", "/search", route, query=q)
    if route == "category":
        q = [("category", r.choice(CATEGORIES))]
        if r.random() < 0.4:
            q.append(("page", str(r.randint(1, 9))))
        if r.random() < 0.3:
            q.append(("min_price", str(r.choice((10, 20, 50)))))
            q.append(("max_price", str(r.choice((100, 200, 500)))))
        return Req("GET", "/products", route, query=q)
    if route == "product":
        q = [("color", r.choice(("black", "white", "navy")))] if r.random() < 0.15 else []
        return Req("GET", f"/products/{pid}", route, query=q)
    if route == "reviews":
        return Req("GET", f"/products/{pid}/reviews", route, query=[("page", str(r.randint(1, 5)))])
    if route == "blog":
        return Req("GET", f"/blog/{r.choice(SLUGS)}", route)
    if route == "login_page":
        nxt = r.choice(("/account", "/cart", "/checkout", f"/products/{pid}"))
        return Req("GET", "/login", route, query=[("next", nxt)] if r.random() < 0.5 else [])
    if route == "login":
        name = r.choice(NAMES)
        user = email_for(r, name) if r.random() < 0.7 else name.split()[0].lower()
        form = [("csrf_token", s.csrf()), ("username", user), ("password", password(r))]
        if r.random() < 0.4:
            form.append(("remember", "on"))
        return Req("POST", "/login", route, body_kind="form", form=form)
    if route == "register":
        name = r.choice(NAMES)
        pw = password(r)
        form = [
            ("csrf_token", s.csrf()),
            ("name", name),
            ("email", email_for(r, name)),
            ("password", pw),
            ("password_confirm", pw),
        ]
        if r.random() < 0.5:
            form.append(("newsletter", "yes"))
        return Req("POST", "/register", route, body_kind="form", form=form)
    if route == "logout":
        return Req("POST", "/logout", route, body_kind="form", form=[("csrf_token", s.csrf())])
    if route == "account":
        return Req("GET", "/account", route)
    if route == "profile":
        form = [
            ("csrf_token", s.csrf()),
            ("display_name", r.choice(NAMES)),
            ("bio", sentences(r) if r.random() < 0.8 else long_text(r)),
            ("address", f"{r.randint(1, 250)} {r.choice(STREETS)}"),
            ("city", r.choice(("Dublin", "München", "São Paulo", "Kraków", "Zürich", "Austin"))),
            ("zip", r.choice(("D02 X285", "80331", "01310-100", "30-001", "8001", "78701"))),
            ("phone", r.choice(("+353 1 234 5678", "(512) 555-0137", "+49 89 1234-567"))),
        ]
        return Req("POST", "/account/profile", route, body_kind="form", form=form)
    if route == "comment":
        form = [
            ("csrf_token", s.csrf()),
            ("product_id", pid),
            ("name", r.choice(NAMES)),
            ("rating", str(r.randint(1, 5))),
            ("text", sentences(r) if r.random() < 0.85 else long_text(r)),
        ]
        return Req("POST", "/comments", route, body_kind="form", form=form)
    if route == "cart":
        return Req("GET", "/cart", route)
    if route == "cart_add":
        form = [("csrf_token", s.csrf()), ("product_id", pid), ("qty", str(r.randint(1, 3)))]
        return Req("POST", "/cart/items", route, body_kind="form", form=form)
    if route == "checkout":
        name = r.choice(NAMES)
        form = [
            ("csrf_token", s.csrf()),
            ("name", name),
            ("email", email_for(r, name)),
            ("address", f"{r.randint(1, 999)} {r.choice(STREETS)}"),
            ("city", r.choice(("Cork", "Lyon", "Osaka", "Toronto"))),
            ("country", r.choice(("IE", "FR", "JP", "CA", "DE", "US"))),
            ("shipping", r.choice(("standard", "express"))),
            ("card_token", "tok_" + "".join(r.choice(string.ascii_letters) for _ in range(24))),
            ("notes", r.choice(("", "Leave at the door; ring twice.", "Gift -- no invoice!"))),
        ]
        return Req("POST", "/checkout", route, body_kind="form", form=form)
    if route == "contact":
        name = r.choice(NAMES)
        form = [
            ("name", name),
            ("email", email_for(r, name)),
            ("subject", r.choice(("Order question", "Return", "Re: invoice #4411", "Hi!"))),
            ("message", long_text(r) if r.random() < 0.5 else sentences(r)),
        ]
        return Req("POST", "/contact", route, body_kind="form", form=form)
    if route == "download":
        return Req("GET", "/download", route, query=[("file", r.choice(FILES))])
    if route == "go":
        return Req("GET", "/go", route, query=[("url", r.choice(OUTBOUND))])
    if route == "api_products":
        q = [("limit", str(r.choice((10, 20, 50)))), ("offset", str(20 * r.randint(0, 10)))]
        if r.random() < 0.4:
            q.append(("q", search_query(r)))
        if r.random() < 0.3:
            q.append(("fields", "id,name,price,stock"))
        return Req("GET", "/api/v1/products", route, query=q, accept="json")
    if route == "api_product":
        return Req("GET", f"/api/v1/products/{pid}", route, accept="json")
    if route == "api_order":
        items = [
            {"product_id": int(r.randint(1, 500)), "qty": r.randint(1, 3)}
            for _ in range(r.randint(1, 4))
        ]
        body = {
            "items": items,
            "shipping": {"name": r.choice(NAMES), "city": r.choice(("Cork", "Osaka", "Kraków"))},
            "note": r.choice(("", "please gift wrap", "select the blue one if available")),
            "coupon": r.choice(("", "SUMMER10", "O'BRIEN5")),
        }
        return Req("POST", "/api/v1/orders", route, body_kind="json", json_body=body, accept="json")
    if route == "api_user":
        body = {"name": r.choice(NAMES), "bio": sentences(r), "locale": s.client.lang[:5]}
        return Req(
            "PUT",
            f"/api/v1/users/{r.randint(1000, 99999)}",
            route,
            body_kind="json",
            json_body=body,
            accept="json",
        )
    if route == "api_cart_delete":
        return Req("DELETE", f"/api/v1/cart/items/{r.randint(1, 10**6)}", route, accept="json")
    if route == "api_upload":
        return _upload(s)
    if route == "api_import":
        return _xml_import(s)
    if route == "api_webhook":
        body = {
            "url": r.choice(
                (
                    "https://hooks.partner-a.com/shop/orders",
                    "https://erp.example.org/api/webhooks/shop?token=8f2c",
                    "https://hooks.slack.com/services/T000/B000/XXXX",
                )
            ),
            "events": r.sample(["order.created", "order.paid", "stock.low", "refund"], 2),
            "secret": "".join(r.choice(string.hexdigits) for _ in range(32)),
        }
        return Req("POST", "/api/v1/webhooks", route, body_kind="json", json_body=body)
    if route == "story":
        sec = r.choice(NEWS_SECTIONS)
        return Req("GET", f"/stories/{sec}/2009/{r.randint(1000, 9999)}.htm", route)
    if route == "latest":
        return Req("GET", "/latest.php", route, query=[("category", r.choice(NEWS_SECTIONS))])
    if route == "gallery":
        return Req("GET", "/gallery.php", route, query=[("section", r.choice(NEWS_SECTIONS))])
    if route == "stories":
        return Req("GET", "/stories.php", route, query=[("date", f"200904{r.randint(10, 22)}")])
    if route == "adclick":
        code = "".join(r.choice(string.ascii_uppercase) for _ in range(4))
        return Req("GET", "/adclick.php", route, query=[("c", code)])
    if route in ("news", "faq"):
        return Req("GET", f"/{route}.html", route)
    if route == "photo":
        return Req("GET", f"/images/photos/{r.randint(100, 6000)}.jpg", route, accept="image")
    if route == "legacy_asset":
        return Req("GET", "/styles/site.css", route, accept="css")
    if route == "css":
        return Req("GET", "/static/css/site.css", route, accept="css")
    if route == "js":
        return Req("GET", "/static/js/app.js", route, accept="js")
    if route == "img":
        return Req("GET", f"/static/img/{r.choice(('logo.svg', 'hero.webp', 'sale.png'))}", route)
    if route == "favicon":
        return Req("GET", "/favicon.ico", route, accept="image")
    if route == "robots":
        return Req("GET", "/robots.txt", route, accept="any")
    if route == "sitemap":
        return Req("GET", "/sitemap.xml", route, accept="any")
    raise ValueError(f"unknown route {route!r}")


def _upload(s: Session) -> Req:
    r = s.rng
    kind = r.choice(("png", "jpg", "pdf", "csv", "txt"))
    names = {
        "png": ("avatar.png", "Screenshot 2024-11-02 at 10.14.07.png", "头像.png"),
        "jpg": ("IMG_2041.jpg", "photo (1).jpg", "Zoë & me.jpg"),
        "pdf": ("receipt.pdf", "O'Brien invoice.pdf", "return-form.pdf"),
        "csv": ("inventory.csv", "orders_2024-Q3.csv"),
        "txt": ("notes.txt", "README.txt"),
    }[kind]
    if kind == "csv":
        rows = ["sku,name,qty,price"] + [
            f'SKU-{r.randint(1000, 9999)},"{r.choice(QUERIES)}",{r.randint(0, 99)},'
            f"{r.randint(1, 500)}.{r.randint(0, 99):02d}"
            for _ in range(r.randint(3, 40))
        ]
        content = ("\n".join(rows) + "\n").encode()
        ctype = "text/csv"
    elif kind == "txt":
        content = long_text(r).encode()
        ctype = "text/plain"
    else:
        content = image_bytes(r, kind)
        ctype = {"png": "image/png", "jpg": "image/jpeg", "pdf": "application/pdf"}[kind]
    parts = [
        Part("csrf_token", s.csrf().encode()),
        Part("title", r.choice(("my avatar", "receipt", "Résumé", "stock update")).encode()),
        Part("file", content, filename=r.choice(names), content_type=ctype),
    ]
    return Req("POST", "/api/v1/upload", "api_upload", body_kind="multipart", parts=parts)


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _xml_import(s: Session) -> Req:
    r = s.rng
    items = "".join(
        f"<product><sku>SKU-{r.randint(1000, 9999)}</sku>"
        f"<name>{_xml_escape(r.choice(QUERIES + HARD_QUERIES + UNICODE_QUERIES))}</name>"
        f'<price currency="EUR">{r.randint(1, 900)}.{r.randint(0, 99):02d}</price>'
        f"<stock>{r.randint(0, 500)}</stock></product>"
        for _ in range(r.randint(1, 12))
    )
    doctype = '<!DOCTYPE products SYSTEM "products.dtd">' if r.random() < 0.1 else ""
    xml = f'<?xml version="1.0" encoding="UTF-8"?>{doctype}<products>{items}</products>'
    return Req("POST", "/api/v1/import", "api_import", body_kind="xml", xml=xml, accept="json")


# --- intents -----------------------------------------------------------------------------------


def xhr(s: Session, route: str) -> None:
    """A script on the page calling the JSON API (cookies, page as Referer, JSON accept)."""
    req = make(route, s)
    req.accept = "json"
    s.send(req, gap=s.rng.uniform(0.05, 1.5))


def _entry(s: Session) -> None:
    """Arriving: from a search engine or link to a landing page, or typing the address."""
    r = s.rng
    landing = r.choice(("home", "home", "product", "search", "blog", "category"))
    req = make(landing, s)
    if r.random() < 0.6:
        req.referer = r.choice(EXTERNAL_REFERERS)
    s.page(req)


def shop(s: Session) -> None:
    r = s.rng
    _entry(s)
    for _ in range(r.randint(2, 12)):
        step = r.choices(
            ("search", "category", "product", "reviews", "cart_add", "cart", "go", "download"),
            weights=(25, 15, 35, 8, 8, 5, 2, 2),
        )[0]
        if step == "search" and r.random() < 0.4:
            xhr(s, "api_products")  # autocomplete
        req = make(step, s)
        if req.method == "POST":
            s.send(req)
            s.think(3.0)
        else:
            s.page(req)
        if step == "product" and r.random() < 0.3:
            xhr(s, "api_product")  # stock check
    if r.random() < 0.3:
        s.page(make("login_page", s))
        s.send(make("login", s))
        s.think(2.0)
        s.cookies.append(("auth", "".join(r.choice(string.hexdigits) for _ in range(48))))
        s.page(make("cart", s))
        if r.random() < 0.2:
            xhr(s, "api_order")  # one-click checkout
        else:
            s.send(make("checkout", s))
        s.think()


def account(s: Session) -> None:
    r = s.rng
    _entry(s)
    s.page(make("login_page", s))
    if r.random() < 0.3:
        s.send(make("register", s))
    else:
        s.send(make("login", s))
    s.think(2.0)
    s.cookies.append(("auth", "".join(r.choice(string.hexdigits) for _ in range(48))))
    s.page(make("account", s))
    for _ in range(r.randint(1, 3)):
        if r.random() < 0.3:
            xhr(s, r.choice(("api_user", "api_cart_delete")))
        else:
            s.send(make("profile", s))
        s.think(20.0)
    if r.random() < 0.5:
        s.send(make("logout", s))


def reader(s: Session) -> None:
    r = s.rng
    _entry(s)
    for _ in range(r.randint(1, 6)):
        step = r.choices(("blog", "product", "reviews", "comment", "contact"), (40, 20, 15, 20, 10))
        req = make(step[0], s)
        if req.method == "POST":
            s.think(40.0)  # typing
            s.send(req)
            s.think(3.0)
        else:
            s.page(req)


def uploader(s: Session) -> None:
    _entry(s)
    s.page(make("account", s))
    for _ in range(s.rng.randint(1, 3)):
        s.think(10.0)
        xhr(s, "api_upload")


def app(s: Session) -> None:
    """The shop's mobile app, or a script on the JSON API: bearer token, short pauses."""
    r = s.rng
    steps = r.randint(3, 20)
    for _ in range(steps):
        step = r.choices(
            (
                "api_products",
                "api_product",
                "api_order",
                "api_user",
                "api_cart_delete",
                "api_upload",
                "api_webhook",
                "api_import",
                "download",
            ),
            weights=(35, 35, 8, 5, 5, 4, 3, 3, 2),
        )[0]
        s.send(make(step, s))
        s.t += min(120.0, r.lognormvariate(math.log(1.5), 1.0))


def news_synthetic(s: Session) -> None:
    r = s.rng
    s.page(make(r.choice(("news", "latest", "home")), s))
    for _ in range(r.randint(1, 8)):
        step = r.choices(
            ("story", "latest", "gallery", "stories", "adclick", "faq"), (45, 20, 15, 10, 8, 2)
        )[0]
        s.page(make(step, s))


_LOG_ROUTES = (
    ("/images/", "photo"),
    ("/styles/", "legacy_asset"),
    ("/js/", "legacy_asset"),
    ("/stories/", "story"),
    ("/news.html", "news"),
    ("/faq.html", "faq"),
    ("/latest.php", "latest"),
    ("/stories.php", "stories"),
    ("/gallery.php", "gallery"),
    ("/adclick.php", "adclick"),
)


def _log_route(path: str) -> str:
    for prefix, route in _LOG_ROUTES:
        if path.startswith(prefix):
            return route
    return "log"  # a path the site no longer has (the log's 404s)


def news_replay(s: Session, visit: list[LogHit]) -> None:
    """A visitor of the logstalgia log, replayed with its own paths and timing."""
    t0 = visit[0].t
    start = s.t
    for h in visit:
        parts = urlsplit(h.path)
        path = unquote(parts.path) or "/"
        query = parse_qsl(parts.query, keep_blank_values=True)
        accept = _accept_for(path)
        req = Req(h.method, path, _log_route(path), query=query, accept=accept)
        s.t = start + (h.t - t0)
        s.send(req)
        if accept == "html":
            s.last_page = url_of(req, s.client)
            if not s.cookies and s.client.kind == "browser":
                s._first_cookies()
    s.think()


def crawler(s: Session, pages: int) -> None:
    """A polite crawler: robots.txt, the sitemap, then pages a few seconds apart, none of the
    disallowed ones."""
    r = s.rng
    s.send(Req("GET", "/robots.txt", "robots", accept="any"))
    s.t += r.uniform(1, 3)
    s.send(Req("GET", "/sitemap.xml", "sitemap", accept="any"))
    for _ in range(pages):
        s.t += r.uniform(2, 6)
        route = r.choices(
            ("product", "blog", "category", "story", "news", "reviews"), (45, 10, 15, 15, 5, 10)
        )[0]
        req = make(route, s)
        if req.path.startswith(ROBOTS_DISALLOW):
            continue
        s.send(req)


INTENTS = {"shop": shop, "account": account, "reader": reader, "uploader": uploader}


# --- population --------------------------------------------------------------------------------


@dataclass
class BenignPlan:
    clients: int = 350  # individual users (NAT users and the flash crowd included)
    duration: float = 3600.0
    nat_users: int = 30
    flash_users: int = 40
    crawlers: int = 2
    crawler_pages: int = 120


def generate(
    plan: BenignPlan,
    rng: random.Random,
    ips: IpAllocator,
    visits: list[list[LogHit]] | None = None,
) -> list[Hit]:
    """Benign hits of ``plan.clients`` users over ``plan.duration`` seconds, time-ordered."""
    hits: list[Hit] = []
    visits = list(visits or [])
    rng.shuffle(visits)
    regular = max(0, plan.clients - plan.nat_users - plan.flash_users - plan.crawlers)

    def run(client: Client, t: float, scenario: str) -> None:
        s = Session(client, rng, t, scenario)
        if client.kind == "app":
            s.scenario = "benign/app" if scenario == "benign/browse" else scenario
            app(s)
        else:
            intent = rng.choices(
                ("shop", "news", "account", "reader", "uploader"), weights=(45, 20, 15, 15, 5)
            )[0]
            s.scenario = scenario if scenario != "benign/browse" else f"benign/{intent}"
            if intent == "news":
                if visits:
                    s.scenario = "benign/news_log"
                    news_replay(s, visits.pop())
                else:
                    news_synthetic(s)
            else:
                INTENTS[intent](s)
        hits.extend(s.hits)

    for _ in range(regular):
        client = new_client(rng, ips.new(), weights=(0.88, 0.12, 0.0))
        run(client, rng.uniform(0, plan.duration * 0.95), "benign/browse")
    # many users behind one address: a campus or office NAT, a mobile carrier's CGNAT
    nat_ip = ips.new()
    cgnat_ip = ips.new()
    for i in range(plan.nat_users):
        client = new_client(rng, nat_ip if i % 3 else cgnat_ip, weights=(0.85, 0.15, 0.0))
        run(client, rng.uniform(0, plan.duration * 0.95), "benign/nat")
    # a flash crowd: a sale link posted somewhere, everyone arrives within a minute
    t_flash = plan.duration * rng.uniform(0.3, 0.6)
    hot = rng.randint(1, 60)
    for _ in range(plan.flash_users):
        client = new_client(rng, ips.new(), weights=(0.8, 0.2, 0.0))
        s = Session(client, rng, t_flash + rng.expovariate(1 / 15.0), "benign/flash_crowd")
        req = Req("GET", f"/products/{hot}", "product", referer="https://t.co/")
        if client.kind == "app":
            req = Req("GET", f"/api/v1/products/{hot}", "api_product", accept="json")
            s.send(req)
            for _ in range(rng.randint(1, 6)):  # refreshing for stock
                s.t += rng.uniform(1, 5)
                s.send(Req("GET", f"/api/v1/products/{hot}", "api_product", accept="json"))
        else:
            s.page(req)
            for _ in range(rng.randint(0, 4)):
                s.page(Req("GET", f"/products/{hot}", "product"))
            if rng.random() < 0.5:
                s.send(make("cart_add", s))
        hits.extend(s.hits)
    for _ in range(plan.crawlers):
        client = new_client(rng, ips.new(), "crawler")
        s = Session(client, rng, rng.uniform(0, plan.duration * 0.3), "benign/crawler")
        crawler(s, plan.crawler_pages)
        hits.extend(s.hits)
    hits.sort(key=lambda h: h.t)
    return hits

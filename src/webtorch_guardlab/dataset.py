"""From corpus samples to the detector's examples: requests replayed in time order through the
same client table the server keeps, so each example carries the history features its client had
when the request arrived — exactly what :meth:`Guard.check` computes live.

Two approximations, because a corpus is not a live server, each chosen so that training sees
the feature with the variance it has in service:

- the response status, which feeds a client's 4xx share, is taken as 404 for a scan (a wordlist
  probe of paths the site does not have) and 200 otherwise;
- every request is taken to arrive on one open connection of its client.

Labels: an attack of the ``scan`` family is **abuse** (a behaviour), any other attack is
**injection** (a content), benign requests are neither.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Iterable, Sequence
from urllib.parse import quote, quote_plus

from webtorch.guard.clients import ClientTable
from webtorch.guard.features import RequestView
from webtorch.guard.train import Example
from webtorch_guardlab.corpus.records import Sample

BEHAVIOUR_FAMILIES = frozenset({"scan"})


def view_of(sample: Sample) -> RequestView:
    path, _, query = sample.target.partition("?")
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in sample.headers]
    return RequestView(sample.method, path, query, headers, sample.body)


# Which part of RequestView a payload position lands in (0 path, 1 query, 2 headers, 3 body).
_FIELD_OF = {
    "path": 0,
    "query": 1,
    "cookie": 2,
    "header": 2,
    "form": 3,
    "json": 3,
    "xml": 3,
    "multipart": 3,
}
_BARE_HEADERS = ((b"host", b"localhost"),)


def isolated(view: RequestView, keep: int) -> RequestView:
    """``view`` with every field but ``keep`` emptied (the path to "/"): field dropout."""
    return RequestView(
        view.method,
        view.path if keep == 0 else "/",
        view.query if keep == 1 else "",
        view.headers if keep == 2 else _BARE_HEADERS,
        view.body if keep == 3 else b"",
    )


def _with_field(view: RequestView, field: int, donor: RequestView) -> RequestView:
    """``view`` with its field ``field`` taken from ``donor``."""
    return RequestView(
        view.method if field != 3 else donor.method,
        donor.path if field == 0 else view.path,
        donor.query if field == 1 else view.query,
        donor.headers if field == 2 else view.headers,
        donor.body if field == 3 else view.body,
    )


def augmented(data: Sequence[Example], samples: Sequence[Sample], seed: int = 0) -> list[Example]:
    """``data`` plus, for each example, two variants that move its telling field (an attack's
    payload field; a random non-empty field of a benign request) out of its context:

    - alone, every other field emptied (field dropout);
    - transplanted into a random benign request of the corpus.

    Without them the detector learns its training site's context as a shortcut: that SQL words
    are benign on /search, say, because the site's users search for "union jack" there, and it
    then waves through an injection into /search, or flags a JSON API it never saw."""
    rng = random.Random(seed)
    benign = [e for e, s in zip(data, samples, strict=True) if s.label == 0]
    out = list(data)
    for example, sample in zip(data, samples, strict=True):
        view = example.view
        if sample.label == 1 and sample.position in _FIELD_OF:
            keep = _FIELD_OF[sample.position]
        elif sample.label == 0:
            present = [i for i, f in enumerate((view.path, view.query, 1, view.body)) if f]
            keep = rng.choice(present)
        else:
            continue
        host = rng.choice(benign)
        for variant, client in (
            (isolated(view, keep), example.client),
            (_with_field(host.view, keep, view), host.client),
        ):
            out.append(Example(variant, client, example.injection, example.abuse))
        if sample.label == 0 and any(name == b"cookie" for name, _ in view.headers):
            fresh = RequestView(
                view.method, view.path, view.query, _fresh_cookies(view.headers, rng), view.body
            )
            out.append(Example(fresh, example.client, 0.0, example.abuse))
    return out


_DIGITS, _LETTERS = "0123456789", "abcdefghijklmnopqrstuvwxyz"


def _fresh_token(value: str, rng: random.Random) -> str:
    """``value`` with every digit and letter redrawn (same class, same case)."""
    out = []
    for ch in value:
        if ch.isdigit():
            out.append(rng.choice(_DIGITS))
        elif ch.isascii() and ch.isalpha():
            letter = rng.choice(_LETTERS)
            out.append(letter.upper() if ch.isupper() else letter)
        else:
            out.append(ch)
    return "".join(out)


def _fresh_cookies(
    headers: Sequence[tuple[bytes, bytes]], rng: random.Random
) -> list[tuple[bytes, bytes]]:
    """``headers`` with the long values of their cookies (session ids, analytics ids: 8
    characters or more) redrawn. A corpus has a few hundred clients, each with one session
    id: without this the detector learns those ids' n-grams as what a benign cookie looks
    like, and a new client's id reads as unfamiliar (the first model with a cookie field of its
    own blocked benign requests for exactly that)."""
    out = []
    for name, value in headers:
        if name == b"cookie":
            pairs = []
            for pair in value.decode("latin-1").split("; "):
                key, sep, token = pair.partition("=")
                if len(token) >= 8:
                    token = _fresh_token(token, rng)
                pairs.append(key + sep + token)
            value = "; ".join(pairs).encode("latin-1")
        out.append((name, value))
    return out


def examples(samples: Iterable[Sample]) -> tuple[list[Example], list[Sample]]:
    """Examples in time order, and the samples in that same order."""
    ordered = sorted(samples, key=lambda s: s.t)
    table = ClientTable(max_clients=1_000_000)
    out: list[Example] = []
    for sample in ordered:
        view = view_of(sample)
        state = table.get(sample.client, sample.t)
        state.connections = 1
        state.arrive(view.path, sample.t)
        features = state.features(sample.t)
        behaviour = sample.family in BEHAVIOUR_FAMILIES
        state.answered(404 if behaviour else 200)
        attack = sample.label == 1
        out.append(Example(view, features, float(attack and not behaviour), float(behaviour)))
    return out, ordered


def families(samples: Sequence[Sample]) -> list[str]:
    return [s.family for s in samples]


_AGENTS = (
    b"curl/8.5.0",
    b"python-requests/2.32.3",
    b"Python-urllib/3.11",
    b"tritonclient/2.50.0",
    b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 "
    b"Safari/537.36",
    b"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    b"Version/17.5 Safari/605.1.15",
)


_NAMES = (
    "id", "uid", "item", "ref", "src", "source", "page", "p", "offset", "limit", "per_page",
    "sort", "order", "dir", "filter", "category", "tag", "lang", "locale", "hl", "tz", "ts", "t",
    "v", "version", "session", "sid", "token", "state", "nonce", "code", "cb", "callback",
    "format", "fields", "expand", "include", "debug", "mode", "view", "tab", "step", "next",
    "return_to", "redirect_uri", "utm_source", "utm_medium", "utm_campaign", "utm_content",
    "gclid", "fbclid", "msclkid", "q", "query", "search", "name", "email", "country", "currency",
)  # fmt: skip
_WORDS = (
    "spring", "launch", "newsletter", "cpc", "email", "social", "banner", "summer-sale",
    "en", "de", "fr", "pt-BR", "ja", "asc", "desc", "price", "name", "recent", "json", "csv",
    "true", "false", "grid", "list", "all", "none", "red shoes", "o'reilly books", "a&b",
)  # fmt: skip
_HOSTS = ("example.com", "shop.example.org", "news.example.net", "localhost:3000", "t.co")


def _value(rng: random.Random) -> str:
    """One ordinary parameter value, as web clients send them (percent-encoded)."""
    kind = rng.randrange(9)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randint(1, 10)))
    if kind == 1:
        return rng.randbytes(rng.choice([4, 8, 12, 16, 20, 32])).hex()
    if kind == 2:
        raw = base64.urlsafe_b64encode(rng.randbytes(rng.choice([9, 12, 18, 24])))
        return raw.decode().rstrip("=")
    if kind == 3:
        return str(uuid.UUID(bytes=rng.randbytes(16)))
    if kind == 4:
        return str(rng.randrange(1_600_000_000, 1_900_000_000) * rng.choice([1, 1000]))
    if kind == 5:
        path = "/".join(rng.choice(_WORDS).replace(" ", "-") for _ in range(rng.randint(0, 3)))
        url = f"{rng.choice(['https', 'http'])}://{rng.choice(_HOSTS)}/{path}"
        if rng.random() < 0.4:
            url += f"?{rng.choice(_NAMES)}={rng.randrange(100)}"
        return quote(url, safe="") if rng.random() < 0.8 else quote(url, safe=":/")
    if kind == 6:
        return quote_plus(rng.choice(_WORDS))
    if kind == 7:
        return f"{rng.randint(2020, 2027)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return rng.choice(["1", "0", "true", "false", "yes", "v2", "1.4.2", "-1", "10.5"])


def ordinary_query(rng: random.Random) -> str:
    """An ordinary query string: one to five common parameters with everyday values (ids,
    tokens, timestamps, tracking tags, return URLs, words). A detector that has seen none of
    these calls them attacks because they are unfamiliar, not because they are hostile."""
    names = rng.sample(_NAMES, rng.randint(1, 5))
    return "&".join(f"{name}={_value(rng)}" for name in names)


def api_examples(n: int, seed: int = 0) -> list[Example]:
    """Benign traffic of WebTorch's own API (inference and training in the short and Open
    Inference Protocol forms, model metadata, health, metrics, the dashboard), from clients of
    several kinds. The shipped detector guards WebTorch itself, so its own endpoints and their
    JSON tensors must read as the ordinary traffic they are; the payload lists' attacks are
    transplanted into them too (:func:`augmented`)."""
    import json

    rng = random.Random(f"api:{seed}")
    table = ClientTable()
    out = []
    t = 0.0
    clients = [
        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(60)
    ]
    for _ in range(n):
        t += rng.expovariate(5.0)
        client = rng.choice(clients)
        model = rng.choice(["xor", "resnet", "bert-base", "my_model", "fraud.v2"])
        rows = [
            [
                round(rng.uniform(-3, 3), rng.choice([0, 1, 3, 6]))
                for _ in range(rng.choice([2, 4, 8]))
            ]
            for _ in range(rng.choice([1, 1, 2, 4, 16]))
        ]
        kind = rng.randrange(10)
        method, path, query, body = "GET", "/v2", "", b""
        if kind < 4:
            method, path = "POST", f"/models/{model}/predict"
            body = json.dumps(
                {"inputs": rows}, separators=rng.choice([(",", ":"), (", ", ": ")])
            ).encode()
        elif kind < 6:
            method, path = "POST", f"/v2/models/{model}/infer"
            flat = [v for row in rows for v in row]
            doc: dict[str, object] = {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [len(rows), len(rows[0])],
                        "datatype": "FP32",
                        "data": flat,
                    }
                ]
            }
            if rng.random() < 0.3:
                doc["id"] = f"req-{rng.randrange(10**6)}"
            body = json.dumps(doc).encode()
        elif kind < 7:
            method, path = "POST", f"/models/{model}/train"
            body = json.dumps(
                {"inputs": rows, "targets": [[rng.randint(0, 1)] for _ in rows]}
            ).encode()
        elif kind < 8:
            path = rng.choice(
                [
                    f"/v2/models/{model}",
                    f"/v2/models/{model}/ready",
                    "/v2/health/ready",
                    "/v2/health/live",
                    "/metrics",
                    "/v2",
                ]
            )
        else:
            path = rng.choice(["/dashboard", "/dashboard/stats", "/dashboard/static/dashboard.js"])
            if path == "/dashboard/stats" and rng.random() < 0.8:
                query = f"since={rng.randrange(1, 5000)}"
        if not query and rng.random() < 0.6:
            query = ordinary_query(rng)
        headers = [
            (b"host", b"127.0.0.1:8080"),
            (b"user-agent", rng.choice(_AGENTS)),
            (b"accept", rng.choice([b"*/*", b"application/json", b"text/html,*/*;q=0.8"])),
        ]
        if body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        if rng.random() < 0.2:
            headers.append((b"authorization", b"Bearer " + rng.randbytes(16).hex().encode()))
        if rng.random() < 0.3:
            headers.append((b"x-request-id", rng.randbytes(8).hex().encode()))
        view = RequestView(method, path, query, headers, body)
        state = table.get(client, t)
        state.connections = 1
        state.arrive(path, t)
        out.append(Example(view, state.features(t), 0.0, 0.0))
        state.answered(200)
    return out

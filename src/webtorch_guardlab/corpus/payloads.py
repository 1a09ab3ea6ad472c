"""Attack payload lists from packages, read into one vocabulary of families.

Each loader reads one package's files and returns :class:`Payload` rows: the family (one of
:data:`FAMILIES`), the text to place in a request, the package it came from, and the file (or
file and category) within it. A loader whose files are missing raises :class:`MissingSource`
whose message says what to install.

Sources (see SOURCES.md for versions, paths and counts):

- ``fray`` (PyPI): JSON and text payload files in 40 category folders; read from an installed
  ``fray`` package, an unpacked wheel, or the ``.whl`` file itself (no need to install fray and
  its dependencies). Curated: several folders are prose for LLM prompt testing, whole HTTP
  requests, header lines or placeholders, and some "payloads" are code scraped from fray's own
  test scripts; those are left out (:data:`FRAY_EXCLUDED` says why).
- ``sqlmap`` (Debian): the test definitions in ``data/xml/payloads/*.xml`` combined with the
  injection boundaries of ``data/xml/boundaries.xml``, as sqlmap itself builds them, both the
  detection payload and the exploitation vector.
- ``wapiti`` (Debian ``wapiti``, PyPI ``wapiti3``): ``wapitiCore/data/attacks`` files and the few
  payloads that its attack modules hold in code.
- ``wfuzz`` (Debian): ``wordlist/Injections/*.txt``, ``vulns/sql_inj.txt``,
  ``vulns/dirTraversal*.txt``; its ``general``/``vulns`` path lists as the ``scan`` family.
- ``dirb`` (Debian): ``wordlists/common.txt`` and ``vulns/*.txt`` as the ``scan`` family.

Tool artefacts are neutralised at load time (:func:`neutralise`): fixed marker strings and
"attacker" domains (``__XSS__``, ``w4p1t1``, ``evil.com``, ``wapiti3.ovh``...) become random
tokens and domains drawn from one pool shared by every source, so that a model cannot learn a
tool's signature instead of the attack. A payload may contain :data:`ORIG`: the injector replaces
it with the parameter's original value (sqlmap's and wapiti's ``[ORIGVALUE]``/``[VALUE]``).
"""

from __future__ import annotations

import configparser
import importlib.util
import io
import json
import os
import random
import re
import string
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus
from xml.etree import ElementTree

from webtorch.errors import WebTorchError

FAMILIES = (
    "sqli",
    "xss",
    "cmdi",
    "path_traversal",
    "lfi_rfi",
    "ssti",
    "xxe",
    "ssrf",
    "ldap",
    "xpath",
    "nosql",
    "crlf",
    "open_redirect",
    "prototype_pollution",
    "deserialization",
    "file_upload",
    "webshell",
    "log_injection",
    "scan",
    "other",
)

# Stands for the parameter's original value; the injector substitutes it (private-use code point,
# so it never occurs in real payloads).
ORIG = "\ue000"

FRAY_VERSION = "3.5.249"
USER_CACHE = Path.home() / ".cache" / "webtorch" / "guard"

INSTALL = {
    "fray": (
        f"pip download --no-deps fray=={FRAY_VERSION} -d {USER_CACHE} "
        "(or pip install fray, or pass the fray package/wheel path)"
    ),
    "sqlmap": "apt-get install -y sqlmap",
    "wapiti": "apt-get install -y wapiti (or pip install wapiti3)",
    "wfuzz": "apt-get install -y wfuzz",
    "dirb": "apt-get install -y dirb",
    "logstalgia": "apt-get install -y logstalgia",
}


class MissingSource(WebTorchError):
    """A payload source's files are not on this machine; the message says how to install them."""

    def __init__(self, source: str, looked: Iterable[str | Path]) -> None:
        where = ", ".join(str(p) for p in looked)
        super().__init__(f"{source} payloads not found (looked in {where}): {INSTALL[source]}")
        self.source = source


@dataclass(frozen=True, slots=True)
class Payload:
    family: str
    text: str
    source: str
    origin: str  # file (and category) within the source
    key: str = ""  # dedupe key: normalise() of the text before neutralising

    def keyed(self) -> Payload:
        return self if self.key else replace(self, key=normalise(self.text))


# --- normalisation and dedupe -----------------------------------------------------------------

_WS = re.compile(r"\s+")


def _decoded(text: str) -> str:
    s = text.replace(ORIG, "")
    for _ in range(8):
        d = unquote_plus(s)
        if d == s:
            break
        s = d
    return s.lower()


def normalise(text: str) -> str:
    """The form payloads are compared in: URL-decoded until stable, lowercase, whitespace
    collapsed, the original-value marker dropped."""
    return _WS.sub(" ", _decoded(text)).strip()


_INERT = re.compile(r"^[a-z0-9 _.\-]{0,16}$")


def is_inert(text: str) -> bool:
    """True for strings that carry no attack on their own (``A``, ``TRUE``, ``env``, ``set``,
    a lone ``,`` or ``*``): fuzzing lists hold them, but a request carrying one is
    indistinguishable from a benign one. A lone quote stays: it is the classic SQL probe."""
    n = normalise(text)
    return bool(_INERT.match(n)) or (len(n) <= 2 and not any(q in n for q in "'\"`"))


def dedupe(payloads: Iterable[Payload], seen: dict[str, str]) -> list[Payload]:
    """Keeps the first payload of each normalised key not already in ``seen`` (key → the split or
    source that holds it) and records the kept ones' keys in ``seen`` under their source."""
    out: list[Payload] = []
    for p in payloads:
        p = p.keyed()
        if p.key in seen:
            continue
        seen[p.key] = p.source
        out.append(p)
    return out


# --- artefact neutralisation ------------------------------------------------------------------

# Plausible third-party hosts, some benign-looking: the same pool replaces every source's fixed
# "attacker" domain so that the domain itself is never the signal.
DOMAIN_POOL = (
    "cdn-metrics.net",
    "img-proxy.io",
    "static-files.org",
    "assets-cache.com",
    "webhook-relay.dev",
    "mail-track.info",
    "a7f3.ngrok-free.app",
    "files.share-box.net",
    "analytics-hub.co",
    "dl.mirror-host.net",
    "api.partner-sync.com",
    "s3.bucket-store.net",
    "blog-feed.org",
    "t.co-links.net",
    "pastebin-like.net",
    "collector.example.net",
    "x9k.burp-like.net",
    "oast.live-check.com",
    "node7.cloud-run.app",
    "geo-ip-lookup.com",
)
_DOMAINS = re.compile(
    r"(?i)\b(?:www\.)?(?:evil|attacker|malicious|malicious-site|evil-cdn|attacker-site|"
    r"attacker-controlled|wapiti3|openbugbounty)\.(?:com|ovh|org|net)\b"
)
_MARKERS = re.compile(r"__XSS__|w4p1t1(?:_md5|_cleartext|_eval)?|WXSS")


def _token(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def neutralise(text: str, rng: random.Random) -> str:
    """Replaces tool-specific domains and marker strings with draws from shared pools."""
    domain = rng.choice(DOMAIN_POOL)
    text = _DOMAINS.sub(domain, text)
    token = _token(rng, rng.randint(4, 9))
    return _MARKERS.sub(token, text)


# Families whose payloads are names, not values: a word is what they are.
_NAMES = frozenset({"scan", "file_upload"})


def _finish(rows: Iterable[Payload], rng: random.Random) -> list[Payload]:
    out = []
    for p in rows:
        if not p.text.strip():
            continue
        if p.family not in _NAMES and is_inert(p.text):
            continue
        key = normalise(p.text)
        out.append(replace(p, text=neutralise(p.text, rng), key=key))
    return out


# --- heuristic family for unlabelled lists ----------------------------------------------------

_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("crlf", re.compile(r"[\r\n][\w-]+\s*:")),
    ("xxe", re.compile(r"<!entity|<!doctype|<\?xml")),
    ("ssti", re.compile(r"\{\{.*\}\}|\$\{.*\}|<%=|#\{")),
    ("xss", re.compile(r"<\s*/?\s*[a-z!]|javascript:|vbscript:|\bon[a-z]+\s*=|alert\s*\(")),
    (
        "path_traversal",
        re.compile(r"\.\.(/|\\|%|\\u)|/etc/(passwd|shadow|hosts)|boot\.ini|win\.ini"),
    ),
    (
        "cmdi",
        re.compile(
            r"[;|`&\n]\s*(id|ls|dir|cat|whoami|ping|uname|wget|curl|nc|sleep|netstat|read|/bin/)"
            r"|\$\("
        ),
    ),
    ("xpath", re.compile(r"count\(|name\(\)|//\w+\[")),
    ("ldap", re.compile(r"\)\s*\(|\*\)")),
    (
        "sqli",
        re.compile(
            r"\bunion\b|\bselect\b|\binsert\b|\bdrop\b|\bwaitfor\b|\bsleep\s*\(|benchmark\s*\("
            r"|\bor\b\s*['\"]?\w*['\"]?\s*=|\band\b\s*\d|--|#|/\*|'|\""
        ),
    ),
)


def classify(text: str) -> str:
    """A family for a payload whose list gives none (wfuzz's mixed lists)."""
    s = _decoded(text)
    for family, pattern in _CLASSES:
        if pattern.search(s):
            return family
    return "other"


# --- fray --------------------------------------------------------------------------------------

FRAY_DIRS: dict[str, str] = {
    "sqli": "sqli",
    "xss": "xss",
    "csp_bypass": "xss",
    "command_injection": "cmdi",
    "path_traversal": "path_traversal",
    "ssti": "ssti",
    "xxe": "xxe",
    "ssrf": "ssrf",
    "ssrf_cloud_metadata": "ssrf",
    "ldap_injection": "ldap",
    "xpath_injection": "xpath",
    "crlf_injection": "crlf",
    "open-redirect": "open_redirect",
    "prototype_pollution": "prototype_pollution",
    "deserialization": "deserialization",
    "web_shells": "webshell",
    "file_upload": "file_upload",
    "logging_failures": "log_injection",
    "modern_bypasses": "",  # family per item (its "category")
    "wordpress": "scan",  # paths of WordPress probes
}

FRAY_EXCLUDED: dict[str, str] = {
    "ai_prompt_injection": "natural-language LLM prompts (and placeholders), not an HTTP injection",
    "llm_testing": "natural-language LLM prompts, not an HTTP injection",
    "rag_security": "natural-language LLM prompts, not an HTTP injection",
    "api_security": "descriptions of API abuse ('POST /api/cart {...}'), not values",
    "auth_bypass": "whole requests and header lines",
    "cache_poison": "header lines whose values are benign on their own (X-Forwarded-Port: 443)",
    "cors": "Origin header lines and exfiltration scripts",
    "host_header_injection": "Host header lines",
    "http2": "HTTP/2 pseudo-header blocks and code",
    "http_smuggling": "whole requests; a parsed request cannot carry them",
    "jwt_attack": "mostly placeholders (RS256_TO_HS256_CONFUSION)",
    "race_condition": "endpoint names; a race is a timing attack",
    "crypto_failures": "placeholders ('Test payload 60 for crypto weakness detection')",
    "buffer_overflow": "CVE descriptions",
    "supply_chain_attack": "client-side skimmer scripts and CI descriptions",
    "massassign": "parameters benign on their own (id=2, credits=10000)",
    "graphql_attacks": "needs a GraphQL endpoint the benign app does not have",
    "other": "fragments ('<div', '1!=1') with no family",
}

_FRAY_ITEM_FAMILY: dict[str, str | None] = {
    "xss": "xss",
    "sqli": "sqli",
    "ssti": "ssti",
    "ssti_unicode": "ssti",
    "command_injection": "cmdi",
    "ssrf": "ssrf",
}
_FRAY_MIXED = frozenset({"modern_bypasses", "xss"})
# Text files that hold one script or document per file, not one payload per line.
_FRAY_TXT_SKIP = frozenset({"web_shells", "llm_testing"})

_HTTP_REQUEST = re.compile(r"^(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) \S+ HTTP/|\r?\nHost:", re.M)
# Python scraped from fray's own test scripts ("payloads" whose items carry "source_file").
_SCRAPED = re.compile(
    r"\bprint\(|\bdef \w+\(|\bfor \w+ in\b|\.format\(|\bf[\"'][^\"']*\{|\]\s*=\s*[\"'\[{(]|"
    r"=\s*[\[{]\s*$|[\"'],\s*$|\n|\bpayloads?\s*[=\[]|\blambda\b|\.append\(|\.replace\(",
    re.M,
)
_VARIANT_SUFFIX = re.compile(r"_variant_\d+$")
_LOG_SUFFIX = re.compile(r"_\d+$")
_FILENAME = re.compile(r"^[\w.%;:\\/\-]{1,80}\.[\w%.\\]+$")


def _fray_tree(location: Path) -> Iterator[tuple[str, bytes]]:
    """(path relative to the payloads folder, content) for every file, sorted."""
    if location.is_file() and location.suffix == ".whl":
        with zipfile.ZipFile(location) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith("fray/payloads/"))
            for n in names:
                if not n.endswith("/"):
                    yield n[len("fray/payloads/") :], zf.read(n)
        return
    root = location
    for cand in (location / "payloads", location / "fray" / "payloads"):
        if cand.is_dir():
            root = cand
            break
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p.relative_to(root).as_posix(), p.read_bytes()


def find_fray(location: Path | None = None) -> Path:
    """The fray payload location: ``location``, ``$WEBTORCH_FRAY``, an installed ``fray``
    package, or a fray wheel in ~/.cache/webtorch/guard."""
    looked: list[str | Path] = []
    cands: list[Path] = []
    env = os.environ.get("WEBTORCH_FRAY")
    if location is not None:
        cands.append(location)  # a location given is the only one looked in
    elif env:
        cands.append(Path(env))
    else:
        spec = importlib.util.find_spec("fray")
        if spec is not None and spec.origin:
            cands.append(Path(spec.origin).parent)
        cands.extend(sorted(USER_CACHE.glob("fray-*.whl"), reverse=True))
    for c in cands:
        looked.append(c)
        if c.is_file() and c.suffix == ".whl":
            return c
        if (c / "payloads").is_dir() or (c / "fray" / "payloads").is_dir():
            return c
    if location is None and not env:
        looked.append(USER_CACHE / "fray-*.whl")
    raise MissingSource("fray", looked)


def _fray_items(rel: str, data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """(payload text, item) from one fray file."""
    if rel.endswith(".json"):
        doc = json.loads(data.decode("utf-8", "replace"))
        items = doc.get("payloads", []) if isinstance(doc, dict) else doc
        for it in items:
            if isinstance(it, dict) and isinstance(it.get("payload"), str):
                yield it["payload"], it
            elif isinstance(it, str):
                yield it, {}
    elif rel.endswith(".txt"):
        lines = [
            ln.rstrip("\r\n")
            for ln in data.decode("utf-8", "replace").splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
        if rel.startswith("xxe/"):
            # one XML document spans several lines; each starts at its prolog
            doc_lines: list[str] = []
            for ln in lines:
                if ln.startswith("<?xml") and doc_lines:
                    yield "".join(doc_lines), {}
                    doc_lines = []
                doc_lines.append(ln)
            if doc_lines:
                yield "".join(doc_lines), {}
        else:
            for ln in lines:
                yield ln, {}


def _fray_family(folder: str, item: dict[str, Any], rel: str = "", text: str = "") -> str | None:
    if rel.startswith("xss/cve_"):
        # these files file CVE probes of every kind under "xss"
        fam = classify(text)
        if fam in ("ssti", "path_traversal", "xxe", "cmdi"):
            return fam
        if text.startswith("/"):
            return "scan"
    if folder in _FRAY_MIXED and isinstance(item.get("category"), str):
        cat = item["category"]
        if cat == folder or cat in _FRAY_ITEM_FAMILY:
            return _FRAY_ITEM_FAMILY.get(cat, FRAY_DIRS.get(folder) or None)
        return None
    return FRAY_DIRS.get(folder) or None


def _fray_keep(text: str, folder: str, item: dict[str, Any]) -> str | None:
    """The payload as it should be sent, or None for junk."""
    t = text.strip("\r\n")
    if not t.strip() or t.lstrip().startswith("#"):
        return None
    if _HTTP_REQUEST.search(t):
        return None
    if "source_file" in item and _SCRAPED.search(t):
        return None
    if folder == "modern_bypasses":
        t = _VARIANT_SUFFIX.sub("", t)
    if folder == "logging_failures":
        t = _LOG_SUFFIX.sub("", t)
    if folder == "wordpress" and not t.startswith("/"):
        return None
    if folder == "file_upload" and not _FILENAME.match(t):
        return None
    if len(t) > 4000:
        return None
    return t


def fray_payloads(location: Path | None = None, *, seed: int = 0) -> list[Payload]:
    """fray's payloads, curated (see module doc), neutralised, deduplicated within fray."""
    loc = find_fray(location)
    rng = random.Random(f"fray:{seed}")
    rows: list[Payload] = []
    for rel, data in _fray_tree(loc):
        folder = rel.split("/", 1)[0]
        if folder in FRAY_EXCLUDED or folder not in FRAY_DIRS:
            continue
        if rel.endswith(".txt") and folder in _FRAY_TXT_SKIP:
            continue
        if not rel.endswith((".json", ".txt")):
            continue
        for text, item in _fray_items(rel, data):
            fam = _fray_family(folder, item, rel, text)
            if fam is None:
                continue
            t = _fray_keep(text, folder, item)
            if t is None:
                continue
            rows.append(Payload(fam, t, "fray", f"{rel}"))
    return dedupe(_finish(rows, rng), {})


# --- sqlmap ------------------------------------------------------------------------------------

SQLMAP_ROOTS = (Path("/usr/share/sqlmap"),)

_INFERENCES = (
    "ORD(MID((SELECT IFNULL(CAST(DATABASE() AS NCHAR),0x20)),{n},1))>{c}",
    "ASCII(SUBSTRING((SELECT COALESCE(CAST(CURRENT_USER AS VARCHAR(10000))::text,' ')),{n},1))>{c}",
    "UNICODE(SUBSTRING((SELECT ISNULL(CAST(@@VERSION AS NVARCHAR(4000)),' ')),{n},1))>{c}",
    "ASCII(SUBSTRC((SELECT NVL(CAST(USER AS NVARCHAR(4000)),' ') FROM DUAL),{n},1))>{c}",
    "{n}={n}",
)
_QUERIES = (
    "SELECT IFNULL(CAST(user() AS NCHAR),0x20)",
    "SELECT COALESCE(CAST(VERSION() AS VARCHAR(10000))::text,' ')",
    "SELECT table_name FROM information_schema.tables LIMIT 1 OFFSET {n}",
    "SELECT NVL(CAST(banner AS NVARCHAR2(4000)),' ') FROM v$version WHERE ROWNUM=1",
    "(CASE WHEN ({n}={n}) THEN 1 ELSE 0 END)",
)


@dataclass(frozen=True, slots=True)
class _Boundary:
    clause: frozenset[int]
    where: frozenset[int]
    prefix: str
    suffix: str


@dataclass(frozen=True, slots=True)
class _SqlTest:
    title: str
    stype: int
    clause: frozenset[int]
    where: frozenset[int]
    vector: str
    payload: str
    comment: str
    columns: str
    char: str


def _ints(text: str | None) -> frozenset[int]:
    return frozenset(int(x) for x in (text or "0").split(",") if x.strip().isdigit())


def _xtext(el: ElementTree.Element, path: str) -> str:
    found = el.find(path)
    return (found.text or "") if found is not None else ""


def _sqlmap_root(root: Path | None) -> Path:
    cands = [root] if root is not None else list(SQLMAP_ROOTS)
    for c in cands:
        if (c / "data" / "xml" / "payloads").is_dir():
            return c
    raise MissingSource("sqlmap", cands)


def _sql_fill(s: str, rng: random.Random) -> str:
    """sqlmap's placeholders, filled the way sqlmap fills them (fresh random values)."""
    nums = {f"[RANDNUM{i}]": str(rng.randint(1000, 9999)) for i in ("", "1", "2", "3", "4", "5")}
    strs = {
        f"[RANDSTR{i}]": "".join(rng.choice(string.ascii_letters) for _ in range(4))
        for i in ("", "1", "2")
    }
    delim = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
    delim2 = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
    n, c = rng.randint(1, 12), rng.randint(32, 126)
    subs = {
        "[GENERIC_SQL_COMMENT]": "-- " + strs["[RANDSTR]"],
        "[INFERENCE]": rng.choice(_INFERENCES).format(n=n, c=c),
        "[QUERY]": rng.choice(_QUERIES).format(n=n),
        "[DELIMITER_START]": f"q{delim}q",
        "[DELIMITER_STOP]": f"q{delim2}q",
        "[SLEEPTIME]": str(rng.choice((5, 5, 5, 10, 3))),
        "[ORIGVALUE]": ORIG,
        "[ORIGINAL]": ORIG,
        "[SPACE_REPLACE]": " ",
        "[DOLLAR_REPLACE]": "$",
        "[HASH_REPLACE]": "#",
        "[AT_REPLACE]": "@",
        "[CHAR]": "NULL",
        "[DELAYED]": "",
        **nums,
        **strs,
    }
    # longest first so [RANDNUM1] is not eaten by [RANDNUM]
    for k in sorted(subs, key=len, reverse=True):
        s = s.replace(k, subs[k])
    return s


def _union(test: _SqlTest, rng: random.Random) -> str:
    lo, hi = 1, 10
    m = re.match(r"\[COLSTART\]-\[COLSTOP\]|(\d+)-(\d+)", test.columns or "")
    if m and m.group(1):
        lo, hi = int(m.group(1)), int(m.group(2))
    n = rng.randint(lo, max(lo, min(hi, 20)))
    char = test.char if test.char and test.char != "[CHAR]" else "NULL"
    cols = [char] * n
    cols[rng.randrange(n)] = "CONCAT(0x71[RANDSTR],0x[RANDNUM],0x71[RANDSTR1])"
    body = "UNION ALL SELECT " + ",".join(cols)
    if "FROM" in test.title.upper() and "DUAL" in test.title.upper():
        body += " FROM DUAL"
    return body


def sqlmap_payloads(root: Path | None = None, *, seed: int = 0, variants: int = 2) -> list[Payload]:
    """Every sqlmap test under every boundary it applies to (all levels and risks), each as its
    detection payload and its exploitation vector, ``variants`` random fillings apiece."""
    base = _sqlmap_root(root)
    rng = random.Random(f"sqlmap:{seed}")
    xml_dir = base / "data" / "xml"
    boundaries = [
        _Boundary(
            _ints(_xtext(b, "clause")),
            _ints(_xtext(b, "where")),
            _xtext(b, "prefix"),
            _xtext(b, "suffix"),
        )
        for b in ElementTree.parse(xml_dir / "boundaries.xml").getroot().iter("boundary")
    ]
    rows: list[Payload] = []
    for f in sorted((xml_dir / "payloads").glob("*.xml")):
        for t in ElementTree.parse(f).getroot().iter("test"):
            test = _SqlTest(
                title=_xtext(t, "title"),
                stype=int(_xtext(t, "stype") or 0),
                clause=_ints(_xtext(t, "clause")),
                where=_ints(_xtext(t, "where")),
                vector=_xtext(t, "vector"),
                payload=_xtext(t, "request/payload"),
                comment=_xtext(t, "request/comment"),
                columns=_xtext(t, "request/columns"),
                char=_xtext(t, "request/char"),
            )
            for b in boundaries:
                if not (0 in test.clause or 0 in b.clause or test.clause & b.clause):
                    continue
                for where in sorted(test.where & b.where):
                    for _ in range(variants):
                        bodies = (
                            [_union(test, rng)] if test.stype == 6 else [test.payload, test.vector]
                        )
                        for body in bodies:
                            if not body:
                                continue
                            head = {1: ORIG, 2: "-" + str(rng.randint(1000, 9999)), 3: ""}[where]
                            text = head + b.prefix + " " + body
                            if test.comment:
                                text += test.comment
                            elif b.suffix and where != 3:
                                text += " " + b.suffix
                            rows.append(Payload("sqli", _sql_fill(text, rng), "sqlmap", f.name))
    return dedupe(_finish(rows, rng), {})


# --- wapiti ------------------------------------------------------------------------------------

WAPITI_ROOTS = (Path("/usr/lib/python3/dist-packages/wapitiCore"),)

# Payloads wapiti 3.0.4's attack modules hold in code (mod_sql, mod_crlf, mod_redirect, mod_ssrf,
# mod_shellshock), with their placeholders; used only when wapiti is installed.
_WAPITI_INLINE = (
    ("sqli", "[VALUE]\xbf'\"(", "mod_sql.py"),
    ("crlf", "http://www.google.fr\r\nwapiti: 3.0.4 version", "mod_crlf.py"),
    ("open_redirect", "https://openbugbounty.org/", "mod_redirect.py"),
    ("ssrf", "[EXTERNAL_ENDPOINT]ssrf/[SESSION_ID]/[PATH_ID]/[PARAM_AS_HEX]/", "mod_ssrf.py"),
    ("cmdi", "() { :;}; echo; echo; echo -e '[BASH_HEX]';", "mod_shellshock.py"),
)


def _wapiti_root(root: Path | None) -> Path:
    cands: list[Path] = [root] if root is not None else list(WAPITI_ROOTS)
    if root is None:
        spec = importlib.util.find_spec("wapitiCore")
        if spec is not None and spec.origin:
            cands.append(Path(spec.origin).parent)
    for c in cands:
        if (c / "data" / "attacks").is_dir():
            return c
    raise MissingSource("wapiti", cands)


def _wapiti_fill(s: str, rng: random.Random) -> str:
    hexs = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    subs = {
        "[TAB]": "\t",
        "[LF]": "\n",
        "[FF]": "\f",
        "[TIME]": str(rng.choice((6, 7, 11))),
        "[TIMEOUT]": "",
        "[EXTERNAL_ENDPOINT]": f"http://{rng.choice(DOMAIN_POOL)}/",
        "[SESSION_ID]": _token(rng, 6),
        "[PATH_ID]": str(rng.randint(1, 400)),
        "[PARAM_AS_HEX]": "".join(rng.choice("0123456789abcdef") for _ in range(8)),
        "[VALUE]": ORIG,
        "[BASH_HEX]": "".join(f"\\x{hexs[i : i + 2]}" for i in range(0, 32, 2)),
        "wapiti: 3.0.4 version": f"X-{_token(rng, 5)}: {_token(rng, 6)}",
    }
    for k, v in subs.items():
        s = s.replace(k, v)
    return s.replace("\\0", "\0")


def _ini_payloads(path: Path) -> list[tuple[str, str]]:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(path.read_text(errors="ignore"))
    return [(sec, cp[sec]["payload"]) for sec in cp.sections() if "payload" in cp[sec]]


def _file_family(section: str, payload: str) -> str:
    if "remote" in section or payload.startswith(("http", "[EXTERNAL", "data:", "php:")):
        return "lfi_rfi"
    if "../" in payload or "..\\" in payload:
        return "path_traversal"
    return "lfi_rfi"


def wapiti_payloads(root: Path | None = None, *, seed: int = 0) -> list[Payload]:
    """wapiti's injection payloads (not its path lists: see :func:`wapiti_scan_paths`)."""
    base = _wapiti_root(root)
    rng = random.Random(f"wapiti:{seed}")
    att = base / "data" / "attacks"
    rows: list[Payload] = []

    def lines(name: str) -> list[str]:
        p = att / name
        if not p.is_file():
            return []
        return [ln.strip(" \n") for ln in p.read_text(errors="ignore").splitlines()]

    for ln in lines("blindSQLPayloads.txt"):
        rows.append(Payload("sqli", _wapiti_fill(ln, rng), "wapiti", "blindSQLPayloads.txt"))
    for ln in lines("execPayloads.txt"):
        rows.append(Payload("cmdi", _wapiti_fill(ln, rng), "wapiti", "execPayloads.txt"))
    ini_files = (
        ("fileHandlingPayloads.ini", ""),
        ("xssPayloads.ini", "xss"),
        ("xxePayloads.ini", "xxe"),
    )
    for name, fam in ini_files:
        if (att / name).is_file():
            for sec, pl in _ini_payloads(att / name):
                family = fam or _file_family(sec, pl)
                rows.append(Payload(family, _wapiti_fill(pl, rng), "wapiti", f"{name}:{sec}"))
    for fam, pl, origin in _WAPITI_INLINE:
        rows.append(Payload(fam, _wapiti_fill(pl, rng), "wapiti", origin))
    return dedupe(_finish(rows, rng), {})


def wapiti_scan_paths(root: Path | None = None, *, seed: int = 0) -> list[Payload]:
    """wapiti's buster (directory brute force) and backup-file lists, as ``scan``."""
    base = _wapiti_root(root)
    rng = random.Random(f"wapiti-scan:{seed}")
    att = base / "data" / "attacks"
    rows: list[Payload] = []
    for ln in _read_lines(att / "busterPayloads.txt"):
        rows.append(Payload("scan", "/" + ln.lstrip("/"), "wapiti", "busterPayloads.txt"))
    files = ("index.php", "login.php", "config.php", "wp-config.php", "web.config", "settings.py")
    for ln in _read_lines(att / "backupPayloads.txt"):
        name = rng.choice(files)
        text = "/" + ln.replace("[FILE_NAME]", name).replace("[FILE_NOEXT]", name.split(".")[0])
        rows.append(Payload("scan", text, "wapiti", "backupPayloads.txt"))
    return dedupe(_finish(rows, rng), {})


# --- wfuzz -------------------------------------------------------------------------------------

WFUZZ_ROOTS = (Path("/usr/share/wfuzz/wordlist"),)

_WFUZZ_FILES = (
    ("Injections/SQL.txt", "sqli"),
    ("Injections/XSS.txt", "xss"),
    ("Injections/Traversal.txt", "path_traversal"),
    ("Injections/XML.txt", ""),
    ("Injections/bad_chars.txt", "other"),
    ("Injections/All_attack.txt", ""),
    ("vulns/sql_inj.txt", "sqli"),
    ("vulns/dirTraversal.txt", "path_traversal"),
    ("vulns/dirTraversal-nix.txt", "path_traversal"),
    ("vulns/dirTraversal-win.txt", "path_traversal"),
)
_WFUZZ_SCAN = (
    "general/common.txt",
    "general/admin-panels.txt",
    "webservices/ws-dirs.txt",
    "webservices/ws-files.txt",
    "vulns/apache.txt",
    "vulns/cgis.txt",
    "vulns/coldfusion.txt",
    "vulns/domino.txt",
    "vulns/frontpage.txt",
    "vulns/iis.txt",
    "vulns/iplanet.txt",
    "vulns/jrun.txt",
    "vulns/netware.txt",
    "vulns/oracle9i.txt",
    "vulns/sharepoint.txt",
    "vulns/sunas.txt",
    "vulns/tests.txt",
    "vulns/tomcat.txt",
    "vulns/vignette.txt",
    "vulns/weblogic.txt",
    "vulns/websphere.txt",
)


def _read_lines(path: Path, *, comments: bool = False) -> list[str]:
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        ln = ln.rstrip("\r\n")
        if not ln.strip() or (comments and ln.startswith("#")):
            continue
        out.append(ln)
    return out


def _root(source: str, root: Path | None, defaults: tuple[Path, ...], probe: str) -> Path:
    cands = [root] if root is not None else list(defaults)
    for c in cands:
        if (c / probe).exists():
            return c
    raise MissingSource(source, cands)


def wfuzz_payloads(root: Path | None = None, *, seed: int = 0) -> list[Payload]:
    """wfuzz's injection lists; its mixed lists get a family by :func:`classify`."""
    base = _root("wfuzz", root, WFUZZ_ROOTS, "Injections")
    rng = random.Random(f"wfuzz:{seed}")
    rows: list[Payload] = []
    for rel, fam in _WFUZZ_FILES:
        comments = rel.startswith("vulns/dirTraversal")
        for ln in _read_lines(base / rel, comments=comments):
            rows.append(Payload(fam or classify(ln), ln, "wfuzz", rel))
    return dedupe(_finish(rows, rng), {})


def wfuzz_scan_paths(root: Path | None = None, *, seed: int = 0) -> list[Payload]:
    base = _root("wfuzz", root, WFUZZ_ROOTS, "general")
    rng = random.Random(f"wfuzz-scan:{seed}")
    rows = [
        Payload("scan", "/" + ln.strip().lstrip("/"), "wfuzz", rel)
        for rel in _WFUZZ_SCAN
        for ln in _read_lines(base / rel, comments=True)
    ]
    return dedupe(_finish(rows, rng), {})


# --- dirb --------------------------------------------------------------------------------------

DIRB_ROOTS = (Path("/usr/share/dirb/wordlists"),)


def dirb_scan_paths(root: Path | None = None, *, seed: int = 0) -> list[Payload]:
    """dirb's common words (with its common extensions) and its per-product vulns lists."""
    base = _root("dirb", root, DIRB_ROOTS, "common.txt")
    rng = random.Random(f"dirb:{seed}")
    exts = [e.strip() for e in _read_lines(base / "extensions_common.txt")] or [".php"]
    rows: list[Payload] = []
    for ln in _read_lines(base / "common.txt"):
        word = ln.strip().lstrip("/")
        # dirb tries each word bare and as a directory; with -X, with extensions
        suffix = rng.choice(["", "/", "", rng.choice(exts)])
        rows.append(Payload("scan", "/" + word + suffix, "dirb", "common.txt"))
    for p in sorted((base / "vulns").glob("*.txt")):
        for ln in _read_lines(p):
            rows.append(Payload("scan", "/" + ln.strip().lstrip("/"), "dirb", f"vulns/{p.name}"))
    return dedupe(_finish(rows, rng), {})


# --- fixtures for tests and for runs without the packages -------------------------------------


def parse_fixture(text: str, source: str = "fixture") -> list[Payload]:
    """``family<TAB>payload`` lines (``#`` comments) → payloads, text as written."""
    rows = []
    for ln in io.StringIO(text):
        ln = ln.rstrip("\n")
        if not ln.strip() or ln.startswith("#"):
            continue
        fam, _, pl = ln.partition("\t")
        if fam not in FAMILIES:
            raise ValueError(f"fixture line {ln!r}: unknown family {fam!r}")
        rows.append(Payload(fam, pl, source, "fixture"))
    return rows


def counts(payloads: Iterable[Payload]) -> dict[str, dict[str, int]]:
    """source → family → count."""
    out: dict[str, dict[str, int]] = {}
    for p in payloads:
        fam = out.setdefault(p.source, {})
        fam[p.family] = fam.get(p.family, 0) + 1
    return {s: dict(sorted(f.items())) for s, f in sorted(out.items())}

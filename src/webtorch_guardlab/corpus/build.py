"""Builds the labelled corpus: ``train.jsonl``, ``test.jsonl`` and ``manifest.json``.

Split by source and family, never by row:

- train: fray's payloads except the held-out families, dirb's path lists (``scan``), and the
  benign sessions of the train clients;
- test: sqlmap, wapiti and wfuzz payloads, fray's held-out families (:data:`HOLDOUT`, families
  the model never sees in training), wfuzz's and wapiti's path lists, and the benign sessions of
  the test clients.

Payloads are deduplicated on their normalised form within each split and across splits (a test
payload whose normal form is in train is dropped, and counted in the manifest). Clients, their
addresses, and the access-log visitors replayed are disjoint between splits. Attackers are drawn
from the same address and user-agent distributions as benign users, some behind the same NAT
addresses, and half of them pause like people do; their sessions start with a few benign page
views. Everything is deterministic for a seed.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from webtorch_guardlab.corpus import payloads as pl
from webtorch_guardlab.corpus.benign import (
    APP_SEGMENTS,
    BenignPlan,
    Hit,
    LogHit,
    Session,
    generate,
    load_access_log,
    log_visits,
    make,
)
from webtorch_guardlab.corpus.inject import RouteWeights, attack_request, route_weights
from webtorch_guardlab.corpus.payloads import Payload
from webtorch_guardlab.corpus.records import Sample, write_jsonl
from webtorch_guardlab.corpus.request import Client, IpAllocator, new_client, render

HOLDOUT = ("ldap", "ssti", "prototype_pollution")


@dataclass
class Sizes:
    clients: int = 500  # benign users over both splits
    test_share: float = 0.3
    duration: float = 3600.0  # seconds of each split's timeline
    train_copies: int = 2  # requests per train payload (different positions and requests)
    test_copies: int = 1
    max_per_family: int = 800  # per split, source and family, after dedupe
    max_scan: int = 500  # per split and source: path lists are long and alike
    nat_share: float = 0.08
    flash_share: float = 0.1
    crawler_pages: int = 120


@dataclass
class Sources:
    """Payload lists for each split (before dedupe), the access log, and what was read."""

    train: list[Payload]
    test: list[Payload]
    log: list[LogHit] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def _deb_version(pkg: str) -> str:
    p = Path("/usr/share/doc") / pkg / "changelog.Debian.gz"
    try:
        with gzip.open(p, "rt", errors="replace") as f:
            m = re.match(r"\S+ \(([^)]+)\)", f.readline())
        return m.group(1) if m else "?"
    except OSError:
        return "?"


def _fray_version(loc: Path) -> str:
    m = re.search(r"fray-([\w.]+?)-py", loc.name)
    if m:
        return m.group(1)
    if loc.is_file() and loc.suffix == ".whl":
        with zipfile.ZipFile(loc) as zf:
            for n in zf.namelist():
                if n.endswith(".dist-info/METADATA"):
                    v = re.search(r"^Version: (\S+)", zf.read(n).decode(), re.M)
                    return v.group(1) if v else "?"
    for meta in sorted(loc.parent.glob("fray-*.dist-info/METADATA")):
        v = re.search(r"^Version: (\S+)", meta.read_text(), re.M)
        if v:
            return v.group(1)
    return "?"


def load_sources(
    *,
    seed: int = 0,
    holdout: tuple[str, ...] = HOLDOUT,
    fray: Path | None = None,
    strict: bool = True,
    log: Path | None = None,
) -> Sources:
    """Reads every package's lists. ``strict``: a missing package raises :class:`MissingSource`
    (the eval needs them all); otherwise it is left out and named in ``missing``."""
    train: list[Payload] = []
    test: list[Payload] = []
    versions: dict[str, str] = {}
    missing: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], list[Payload]]) -> list[Payload]:
        try:
            return fn()
        except pl.MissingSource as exc:
            if strict:
                raise
            missing[name] = str(exc)
            return []

    fray_rows = attempt("fray", lambda: pl.fray_payloads(fray, seed=seed))
    if fray_rows:
        versions["fray"] = _fray_version(pl.find_fray(fray))
    train += [p for p in fray_rows if p.family not in holdout]
    train += attempt("dirb", lambda: pl.dirb_scan_paths(seed=seed))
    test += [p for p in fray_rows if p.family in holdout]
    test += attempt("wapiti", lambda: pl.wapiti_payloads(seed=seed))
    test += attempt("wfuzz", lambda: pl.wfuzz_payloads(seed=seed))
    test += attempt("sqlmap", lambda: pl.sqlmap_payloads(seed=seed))
    test += attempt("wfuzz", lambda: pl.wfuzz_scan_paths(seed=seed))
    test += attempt("wapiti", lambda: pl.wapiti_scan_paths(seed=seed))
    for pkg in ("sqlmap", "wapiti", "wfuzz", "dirb", "logstalgia"):
        if pkg not in missing:
            versions[pkg] = _deb_version(pkg)
    hits = load_access_log(log) if log is not None else load_access_log()
    if not hits:
        missing["logstalgia"] = f"access log not found: {pl.INSTALL['logstalgia']}"
        versions.pop("logstalgia", None)
    return Sources(train=train, test=test, log=hits, versions=versions, missing=missing)


def _scan_ok(p: Payload) -> bool:
    """A scan path that the site itself serves is no probe."""
    if p.family != "scan":
        return True
    first = p.text.lstrip("/").split("/", 1)[0].split("?", 1)[0]
    return first not in APP_SEGMENTS and not any(c in p.text for c in "\r\n\t ")


def split_payloads(
    src: Sources, sizes: Sizes, rng: random.Random
) -> tuple[list[Payload], list[Payload], dict[str, Any]]:
    """Deduplicated, capped payloads for train and test, and what was dropped."""
    seen: dict[str, str] = {}
    train = pl.dedupe([p for p in src.train if _scan_ok(p)], seen)
    train_keys = set(seen)
    cross: dict[str, int] = {}
    within: dict[str, int] = {}
    test: list[Payload] = []
    for p in src.test:
        p = p.keyed()
        if not _scan_ok(p):
            continue
        k = f"{p.source}/{p.family}"
        if p.key in train_keys:
            cross[k] = cross.get(k, 0) + 1
            continue
        if p.key in seen:
            within[k] = within.get(k, 0) + 1
            continue
        seen[p.key] = p.source
        test.append(p)
    capped: dict[str, int] = {}

    def cap(rows: list[Payload], split: str) -> list[Payload]:
        groups: dict[tuple[str, str], list[Payload]] = {}
        for p in rows:
            groups.setdefault((p.source, p.family), []).append(p)
        out = []
        for key in sorted(groups):
            g = groups[key]
            limit = sizes.max_scan if key[1] == "scan" else sizes.max_per_family
            if len(g) > limit:
                capped[f"{split}:{key[0]}/{key[1]}"] = len(g) - limit
                g = rng.sample(g, limit)
            out.extend(g)
        return out

    dropped = {
        "test_in_train": dict(sorted(cross.items())),
        "test_duplicates": dict(sorted(within.items())),
    }
    train_c, test_c = cap(train, "train"), cap(test, "test")
    dropped["capped"] = dict(sorted(capped.items()))
    return train_c, test_c, dropped


@dataclass
class _Row:
    hit: Hit
    payload: Payload | None
    position: str


def _attacks(
    payloads: list[Payload],
    copies: int,
    sizes: Sizes,
    rng: random.Random,
    ips: IpAllocator,
    shared_ips: list[str],
    weights: RouteWeights,
) -> tuple[list[_Row], int]:
    """Attack rows (with the attackers' benign page views); returns them and the attacker count."""
    items = [p for p in payloads for _ in range(copies)]
    rng.shuffle(items)
    scans = [p for p in items if p.family == "scan"]
    others = [p for p in items if p.family != "scan"]
    rows: list[_Row] = []
    attackers = 0

    def attacker() -> Client:
        ip = rng.choice(shared_ips) if shared_ips and rng.random() < 0.1 else ips.new()
        return new_client(rng, ip, weights=(0.88, 0.12, 0.0))

    for group_items, scan in ((others, False), (scans, True)):
        i = 0
        while i < len(group_items):
            n = rng.randint(20, 200) if scan else rng.randint(3, 60)
            batch = group_items[i : i + n]
            i += n
            attackers += 1
            client = attacker()
            s = Session(client, rng, rng.uniform(0, sizes.duration * 0.95), "benign/attacker")
            # a look around first, as people and crawling scanners do (and so the attack
            # carries the site's cookies and a Referer, as benign requests do)
            for _ in range(rng.randint(1, 3)):
                route = "home" if client.kind == "browser" else "api_products"
                req = make(route if rng.random() < 0.5 else "search", s)
                if client.kind == "browser":
                    s.page(req)
                else:
                    s.send(req)
                    s.t += rng.uniform(0.2, 3)
            for h in s.hits:
                rows.append(_Row(h, None, ""))
            s.hits.clear()
            automated = scan or rng.random() < 0.5
            for p in batch:
                req, pos = attack_request(p, s, weights=weights)
                s.send(req)
                rows.append(_Row(s.hits.pop(), p, pos))
                if automated:
                    s.t += min(30.0, rng.lognormvariate(math.log(0.4), 0.8))
                else:
                    s.think()
    return rows, attackers


def _samples(rows: list[_Row], split: str, rng: random.Random) -> list[Sample]:
    out = []
    for row in sorted(rows, key=lambda r: r.hit.t):
        h = row.hit
        target, headers, body = render(h.req, h.client, rng)
        p = row.payload
        out.append(
            Sample(
                method=h.req.method,
                target=target,
                headers=headers,
                body=body,
                label=0 if p is None else 1,
                family="benign" if p is None else p.family,
                source=h.scenario if p is None else p.source,
                client=h.client.ip,
                t=h.t,
                split=split,
                position=row.position,
            )
        )
    return out


def _count(samples: list[Sample]) -> dict[str, Any]:
    by: dict[str, Any] = {"total": len(samples), "label": {}, "source": {}, "position": {}}
    clients: dict[int, set[str]] = {0: set(), 1: set()}
    users: set[str] = set()  # addresses of benign users (not attackers' own page views)
    for s in samples:
        if s.label == 0 and s.source != "benign/attacker":
            users.add(s.client)
        by["label"][str(s.label)] = by["label"].get(str(s.label), 0) + 1
        fams = by["source"].setdefault(s.source, {})
        fams[s.family] = fams.get(s.family, 0) + 1
        if s.label:
            by["position"][s.position] = by["position"].get(s.position, 0) + 1
        clients[s.label].add(s.client)
    by["source"] = {k: dict(sorted(v.items())) for k, v in sorted(by["source"].items())}
    by["position"] = dict(sorted(by["position"].items()))
    by["family"] = {}
    for fams in by["source"].values():
        for f, n in fams.items():
            by["family"][f] = by["family"].get(f, 0) + n
    by["family"] = dict(sorted(by["family"].items()))
    by["addresses"] = {
        "benign": len(clients[0]),
        "attack": len(clients[1]),
        "attack_shared_with_users": len(clients[1] & users),
    }
    return by


def build_corpus(
    out_dir: Path,
    seed: int = 0,
    sizes: Sizes | None = None,
    sources: Sources | None = None,
    *,
    holdout: tuple[str, ...] = HOLDOUT,
    fray: Path | None = None,
) -> dict[str, Any]:
    """Writes train.jsonl, test.jsonl and manifest.json into ``out_dir``; returns the manifest.
    ``sources`` defaults to every package's lists (:func:`load_sources`, strict)."""
    started = time.monotonic()
    sizes = sizes or Sizes()
    src = sources if sources is not None else load_sources(seed=seed, holdout=holdout, fray=fray)
    rng = random.Random(seed)
    ips = IpAllocator(random.Random(f"ips:{seed}"))
    train_p, test_p, dropped = split_payloads(src, sizes, rng)

    visits = log_visits(src.log)
    rng.shuffle(visits)
    n_test_visits = round(len(visits) * sizes.test_share)
    split_visits = {"test": visits[:n_test_visits], "train": visits[n_test_visits:]}
    n_test = round(sizes.clients * sizes.test_share)
    split_clients = {"train": sizes.clients - n_test, "test": n_test}

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "seed": seed,
        "sizes": asdict(sizes),
        "holdout_families": list(holdout),
        "versions": dict(sorted(src.versions.items())),
        "missing_sources": src.missing,
        "fray_excluded": pl.FRAY_EXCLUDED,
        "payloads": {
            "train": pl.counts(train_p),
            "test": pl.counts(test_p),
        },
        "dropped": dropped,
        "splits": {},
    }
    for split, payloads, copies in (
        ("train", train_p, sizes.train_copies),
        ("test", test_p, sizes.test_copies),
    ):
        srng = random.Random(f"{split}:{seed}")
        n = split_clients[split]
        plan = BenignPlan(
            clients=n,
            duration=sizes.duration,
            nat_users=round(n * sizes.nat_share),
            flash_users=round(n * sizes.flash_share),
            crawlers=max(1, round(n / 175)),
            crawler_pages=sizes.crawler_pages,
        )
        hits = generate(plan, srng, ips, split_visits[split])
        shared = sorted({h.client.ip for h in hits if h.scenario == "benign/nat"})
        rows = [_Row(h, None, "") for h in hits]
        by_kind: dict[str, list[str]] = {}
        for h in hits:
            by_kind.setdefault(h.client.kind, []).append(h.req.route)
        weights = route_weights(by_kind)
        attack_rows, attackers = _attacks(payloads, copies, sizes, srng, ips, shared, weights)
        samples = _samples(rows + attack_rows, split, srng)
        path = out_dir / f"{split}.jsonl"
        write_jsonl(path, samples)
        counts = _count(samples)
        counts["benign_users"] = n
        counts["attackers"] = attackers
        counts["log_visits"] = len(split_visits[split])
        counts["bytes"] = path.stat().st_size
        manifest["splits"][split] = counts
    manifest["build_seconds"] = round(time.monotonic() - started, 2)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest

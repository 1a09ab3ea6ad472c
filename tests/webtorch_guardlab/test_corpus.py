"""The guard's corpus builder, on small built-in payload lists and a fake access log (the Debian
and PyPI packages are not needed: loaders are tested on miniature copies of their file formats)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import h11
import httptools
import pytest

from webtorch_guardlab.corpus import Sample, Sizes, Sources, build_corpus, read_jsonl, write_jsonl
from webtorch_guardlab.corpus import payloads as pl
from webtorch_guardlab.corpus.benign import (
    ROUTE_NAMES,
    BenignPlan,
    Session,
    generate,
    log_visits,
    make,
    read_access_log,
)
from webtorch_guardlab.corpus.build import split_payloads
from webtorch_guardlab.corpus.inject import ROUTES, attack_request
from webtorch_guardlab.corpus.payloads import ORIG, MissingSource, Payload
from webtorch_guardlab.corpus.request import APP_UAS, BROWSER_UAS, IpAllocator, new_client, render

TRAIN_FIXTURE = """\
sqli\t' OR '1'='1
sqli\t1 UNION SELECT NULL,NULL--
sqli\t%27%20OR%201%3D1--
xss\t<script>alert(1)</script>
xss\t"><img src=x onerror=alert(document.cookie)>
cmdi\t; cat /etc/passwd
cmdi\t| id
path_traversal\t../../../../etc/passwd
path_traversal\t..%2f..%2f..%2fwindows%2fwin.ini
ssrf\thttp://169.254.169.254/latest/meta-data/
open_redirect\t//evil.com/landing
xxe\t<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>
crlf\t%0d%0aSet-Cookie: admin=1
file_upload\tshell.php.jpg
webshell\t<?php system($_GET['c']); ?>
prototype_pollution\t{"__proto__": {"isAdmin": true}}
prototype_pollution\t?__proto__[admin]=1
ssti\t{{7*7}}
ldap\t*)(uid=*))(|(uid=*
scan\t/wp-login.php
scan\t/.git/config
"""
TEST_FIXTURE = """\
sqli\t' or '1'='1
sqli\t1 AND SLEEP(5)#
sqli\t\ue000') AND 4821=4821 AND ('abcd'='abcd
xss\t<svg/onload=alert(1)>
path_traversal\t....//....//etc/hosts
lfi_rfi\t/etc/passwd\x00
cmdi\t`sleep 5`
xxe\t<?xml version="1.0"?><!DOCTYPE b [<!ENTITY y SYSTEM "file:///etc/hosts">]><b>&y;</b>
scan\t/phpmyadmin/
scan\t/server-status
"""
LOG_FIXTURE = "\n".join(
    f'host-{h}.example.net - - [22/Apr/2009:18:5{m}:{s:02d} +1200] "GET {p} HTTP/1.1" 200 100 '
    f'"-" "Mozilla/4.0 (compatible; MSIE 7.0)" "-"'
    for h, m, s, p in (
        (1, 2, 51, "/news.html"),
        (1, 2, 51, "/styles/site.css"),
        (1, 2, 52, "/images/photos/455.jpg"),
        (1, 3, 10, "/latest.php?category=national"),
        (2, 2, 55, "/stories/business/2009/1234.htm"),
        (2, 3, 1, "/js/menu.js"),
        (2, 3, 30, "/gallery.php?section=sport"),
        (2, 4, 2, "/adclick.php?c=ABTJ"),
        (3, 2, 59, "/faq.html"),
        (3, 3, 3, "/stories.php?date=20090422"),
        (3, 3, 40, "/old/page.html"),
    )
)


def fixture_payloads(text: str, source_by_family: dict[str, str] | None = None) -> list[Payload]:
    rows = pl.parse_fixture(text)
    return [
        Payload(p.family, p.text, (source_by_family or {}).get(p.family, p.source), "fixture")
        for p in rows
    ]


def fixture_sources() -> Sources:
    holdout = {"ssti", "ldap", "prototype_pollution"}
    fray = fixture_payloads(TRAIN_FIXTURE, {f: "fray" for f in pl.FAMILIES})
    train = [p for p in fray if p.family not in holdout]
    test = [p for p in fray if p.family in holdout]
    test += fixture_payloads(TEST_FIXTURE, {f: "wfuzz" for f in pl.FAMILIES})
    return Sources(train=train, test=test, log=read_access_log(LOG_FIXTURE))


SMALL = Sizes(clients=200, duration=900.0, crawler_pages=20, train_copies=3, test_copies=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Sample]]:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, seed=7, sizes=SMALL, sources=fixture_sources())
    return {s: list(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "test")}


def parse_h11(raw: bytes) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    req = conn.next_event()
    assert isinstance(req, h11.Request), req
    body = b""
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return req, body
        else:
            raise AssertionError(f"incomplete request: {ev!r}")


def parse_httptools(raw: bytes) -> bool:
    done = []

    class P:
        def on_message_complete(self) -> None:
            done.append(True)

    parser = httptools.HttpRequestParser(P())
    parser.feed_data(raw)
    return bool(done)


# --- normalisation and dedupe -------------------------------------------------------------------


def test_normalise_decodes_repeatedly_lowercases_and_collapses_space() -> None:
    assert pl.normalise("%2527%20OR%201%3D1--") == "' or 1=1--"
    assert pl.normalise("' OR  '1'='1") == pl.normalise("%27+or+%271%27%3D%271")
    assert pl.normalise(f"{ORIG}') AND\t1=1") == "') and 1=1"
    assert pl.normalise("  <ScRiPt>\n alert(1)</script> ") == "<script> alert(1)</script>"


def test_inert_strings_are_not_attacks() -> None:
    for s in ("A", "TRUE", "00", "env", "set", "sleep 5"):
        assert pl.is_inert(s), s
    for s in ("'", "../", "<b>", "1 OR 1=1", "/etc/passwd", "${7*7}"):
        assert not pl.is_inert(s), s


def test_dedupe_across_splits_drops_test_payloads_seen_in_train() -> None:
    src = fixture_sources()
    train, test, dropped = split_payloads(src, Sizes(), random.Random(0))
    train_keys = {p.key for p in train}
    test_keys = [p.key for p in test]
    assert not train_keys & set(test_keys)
    assert len(test_keys) == len(set(test_keys))
    # "' or '1'='1" in the test list is fray's "' OR '1'='1" in another case
    assert dropped["test_in_train"] == {"wfuzz/sqli": 1}
    assert all(p.text != "' or '1'='1" for p in test)
    # within a split, differently encoded copies collapse too
    rows = [Payload("sqli", "' OR 1=1--", "a", ""), Payload("sqli", "%27%20or%201=1--", "b", "")]
    assert len(pl.dedupe(rows, {})) == 1


def test_scan_paths_the_site_serves_are_not_probes() -> None:
    src = Sources(
        train=[Payload("scan", "/login", "dirb", ""), Payload("scan", "/admin.php", "dirb", "")],
        test=[Payload("scan", "/api/", "wfuzz", ""), Payload("scan", "/.env", "wfuzz", "")],
    )
    train, test, _ = split_payloads(src, Sizes(), random.Random(0))
    assert [p.text for p in train] == ["/admin.php"]
    assert [p.text for p in test] == ["/.env"]


def test_neutralise_replaces_tool_markers_and_attacker_domains() -> None:
    rng = random.Random(1)
    out = pl.neutralise(
        "<script>alert('__XSS__')</script> http://evil.com/x http://wapiti3.ovh/", rng
    )
    assert "__XSS__" not in out and "evil.com" not in out and "wapiti3" not in out
    assert out.startswith("<script>alert('")


# --- loaders on miniature copies of the packages' files ----------------------------------------


def test_fray_loader_curates_folders_and_drops_junk(tmp_path: Path) -> None:
    root = tmp_path / "payloads"
    (root / "sqli").mkdir(parents=True)
    (root / "xss").mkdir()
    (root / "llm_testing").mkdir()
    (root / "path_traversal").mkdir()
    doc = {
        "category": "sqli",
        "payloads": [
            {"payload": "' UNION SELECT NULL--"},
            {"payload": "# Nuclei template: CVE-2022-1453"},
            {"payload": "GET /x?id=1 HTTP/1.1\r\nHost: t"},
        ],
    }
    (root / "sqli" / "general.json").write_text(json.dumps(doc))
    xss = {
        "payloads": [
            {"payload": '" onfocus=alert(1) autofocus x="', "source_file": "a.py"},
            {"payload": 'print("=" * 70)\nfor p in P:', "source_file": "a.py"},
            {"payload": "svg", "source_file": "a.py"},
            {"payload": "{{7*7}}", "category": "ssti"},
            {"payload": "<img src=x onerror=alert(1)>", "category": "xss"},
        ]
    }
    (root / "xss" / "basic.json").write_text(json.dumps(xss))
    (root / "llm_testing" / "p.json").write_text(json.dumps([{"payload": "Ignore all rules"}]))
    (root / "path_traversal" / "list.txt").write_text("# comment\n../../etc/passwd\n\n..\\..\\x\n")
    rows = pl.fray_payloads(tmp_path)
    got = sorted((p.family, p.text) for p in rows)
    assert got == [
        ("path_traversal", "../../etc/passwd"),
        ("path_traversal", "..\\..\\x"),
        ("sqli", "' UNION SELECT NULL--"),
        ("ssti", "{{7*7}}"),
        ("xss", '" onfocus=alert(1) autofocus x="'),
        ("xss", "<img src=x onerror=alert(1)>"),
    ]
    assert all(p.source == "fray" for p in rows)


def test_fray_reads_the_wheel_itself(tmp_path: Path) -> None:
    import zipfile

    whl = tmp_path / "fray-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fray/payloads/sqli/a.json", json.dumps([{"payload": "1' OR 1=1#"}]))
        zf.writestr("fray/cli.py", "")
    assert [p.text for p in pl.fray_payloads(whl)] == ["1' OR 1=1#"]


def test_sqlmap_loader_combines_tests_with_boundaries(tmp_path: Path) -> None:
    xml = tmp_path / "data" / "xml"
    (xml / "payloads").mkdir(parents=True)
    (xml / "boundaries.xml").write_text(
        "<root><boundary><level>1</level><clause>1</clause><where>1,2</where><ptype>2</ptype>"
        "<prefix>'</prefix><suffix> AND '[RANDSTR]'='[RANDSTR]</suffix></boundary></root>"
    )
    (xml / "payloads" / "boolean_blind.xml").write_text(
        "<root><test><title>AND boolean</title><stype>1</stype><level>1</level><risk>1</risk>"
        "<clause>1</clause><where>1</where><vector>AND [INFERENCE]</vector>"
        "<request><payload>AND [RANDNUM]=[RANDNUM]</payload></request></test></root>"
    )
    rows = pl.sqlmap_payloads(tmp_path, variants=1)
    assert {p.family for p in rows} == {"sqli"}
    texts = [p.text for p in rows]
    assert len(texts) == 2  # the payload and the vector
    detect = next(t for t in texts if "[" not in t and "=" in t and "AND (" not in t)
    assert detect.startswith(ORIG + "' AND ")
    num = detect.split("AND ")[1].split("=")[0]
    assert detect.split("AND ")[1].startswith(f"{num}={num}")
    assert all("[RAND" not in t and "[INFERENCE]" not in t for t in texts)


def test_wapiti_and_wfuzz_loaders(tmp_path: Path) -> None:
    att = tmp_path / "wapiti" / "data" / "attacks"
    att.mkdir(parents=True)
    (att / "blindSQLPayloads.txt").write_text("' or sleep([TIME])#[LF]1\n")
    (att / "execPayloads.txt").write_text(";env;\nenv\n")
    (att / "xssPayloads.ini").write_text("[s]\npayload = <ScRiPt>alert('__XSS__')</sCrIpT>\n")
    (att / "busterPayloads.txt").write_text("admin.php\nlogin\n")
    rows = pl.wapiti_payloads(tmp_path / "wapiti")
    fams = Counter(p.family for p in rows)
    # with the payloads wapiti's modules hold in code (mod_sql, mod_shellshock...); "env" is inert
    assert fams["sqli"] == 2 and fams["cmdi"] == 2 and fams["xss"] == 1
    assert all("__XSS__" not in p.text and "[TIME]" not in p.text for p in rows)
    scan = pl.wapiti_scan_paths(tmp_path / "wapiti")
    assert sorted(p.text for p in scan) == ["/admin.php", "/login"]

    wf = tmp_path / "wfuzz"
    (wf / "Injections").mkdir(parents=True)
    (wf / "Injections" / "All_attack.txt").write_text("A\nTRUE\n<script>x</script>\n../../x\n")
    (wf / "Injections" / "SQL.txt").write_text("' or 1=1 --\n")
    got = {(p.family, p.text) for p in pl.wfuzz_payloads(wf)}
    assert got == {("xss", "<script>x</script>"), ("path_traversal", "../../x"),
                   ("sqli", "' or 1=1 --")}  # fmt: skip


def test_missing_sources_say_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(MissingSource, match="pip download --no-deps fray"):
        pl.fray_payloads(tmp_path / "nothing")
    with pytest.raises(MissingSource, match="apt-get install -y sqlmap"):
        pl.sqlmap_payloads(tmp_path)
    with pytest.raises(MissingSource, match="apt-get install -y wfuzz"):
        pl.wfuzz_payloads(tmp_path)
    with pytest.raises(MissingSource, match="apt-get install -y dirb"):
        pl.dirb_scan_paths(tmp_path)
    with pytest.raises(MissingSource, match="wapiti"):
        pl.wapiti_payloads(tmp_path)


# --- requests -----------------------------------------------------------------------------------


def _session(kind: str, seed: int = 3) -> Session:
    rng = random.Random(seed)
    client = new_client(rng, "203.0.113.9", kind)
    s = Session(client, rng, 0.0, "test")
    s.cookies = [("sid", client.session), ("consent", "all")]
    return s


@pytest.mark.parametrize("route", sorted(ROUTE_NAMES))
def test_every_route_makes_a_valid_request(route: str) -> None:
    for kind in ("browser", "app"):
        s = _session(kind)
        req = make(route, s)
        target, headers, body = render(req, s.client, s.rng)
        raw = Sample(req.method, target, headers, body, 0, "benign", "t", "1.2.3.4", 0, "train")
        parsed, got = parse_h11(raw.to_http())
        assert parsed.method.decode() == req.method
        assert got == body
        assert parse_httptools(raw.to_http())


MARK = "Zq'<\"x;y&z>é%2e "


@pytest.mark.parametrize("kind", ["browser", "app"])
def test_injection_positions_make_valid_requests_that_carry_the_payload(kind: str) -> None:
    fams = {"query": "sqli", "form": "sqli", "json": "xss", "cookie": "sqli", "header": "xss",
            "path": "path_traversal", "multipart": "sqli", "xml": "xxe"}  # fmt: skip
    for position in ROUTES[kind]:
        for seed in range(6):
            s = _session(kind, seed)
            payload = Payload(fams[position], MARK, "t", "")
            req, pos = attack_request(payload, s, position)
            assert pos == position
            target, headers, body = render(req, s.client, s.rng)
            raw = Sample(req.method, target, headers, body, 1, "x", "t", "1.2.3.4", 0, "train")
            wire = raw.to_http()
            _, got = parse_h11(wire)
            assert got == body and parse_httptools(wire)
            assert all(
                0x20 <= b < 0x7F for b in wire.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"")
            )
            assert _carries(position, raw, MARK), (position, wire[:600])


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _strings(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def _carries(position: str, s: Sample, mark: str) -> bool:
    want = mark.replace("%2e", ".")  # a pre-encoded escape reaches the server as written
    parts = urlsplit(s.target)
    if position == "query":
        return any(want in unquote_plus(v) for _, v in parse_qsl(parts.query))
    if position == "path":
        return want.strip() in unquote(parts.path)
    if position == "form":
        return any(want in v for _, v in parse_qsl(s.body.decode()))
    if position == "json":
        return any(mark in leaf for leaf in _strings(json.loads(s.body)))
    if position == "cookie":
        return want in unquote(s.header("Cookie") or "")
    if position == "header":
        value = (s.header("User-Agent") or "") + (s.header("Referer") or "")
        return unquote(value).find(want.replace("é", "")) >= 0 or "%C3%A9" in value
    if position in ("multipart", "xml"):
        return mark.encode() in s.body
    raise AssertionError(position)


def test_orig_marker_keeps_the_original_value() -> None:
    s = _session("browser")
    p = Payload("sqli", ORIG + "' AND 1=1-- x", "sqlmap", "")
    for _ in range(10):
        req, _ = attack_request(p, s, "form")
        values = [v for k, v in req.form if v.endswith("' AND 1=1-- x")]
        assert values and all(ORIG not in v for v in values)


def test_crawlers_send_no_attacks() -> None:
    with pytest.raises(ValueError, match="crawler"):
        attack_request(Payload("sqli", "'", "t", ""), _session("crawler"))


# --- benign traffic -----------------------------------------------------------------------------


def _benign(seed: int, clients: int = 80) -> list[tuple[float, str, str, str]]:
    rng = random.Random(seed)
    visits = log_visits(read_access_log(LOG_FIXTURE))
    plan = BenignPlan(clients=clients, duration=600.0, crawler_pages=30)
    hits = generate(plan, rng, IpAllocator(random.Random(seed + 1)), visits)
    return [(h.t, h.client.ip, h.req.route, h.scenario) for h in hits]


def test_benign_generator_is_deterministic() -> None:
    assert _benign(5) == _benign(5)
    assert _benign(5) != _benign(6)


def test_benign_traffic_covers_the_routes_and_scenarios() -> None:
    hits = _benign(11, clients=300)
    routes = {r for _, _, r, _ in hits}
    assert routes >= ROUTE_NAMES
    scenarios = {sc for *_, sc in hits}
    assert {"benign/nat", "benign/flash_crowd", "benign/crawler", "benign/news_log"} <= scenarios
    ts = [t for t, *_ in hits]
    assert ts == sorted(ts)
    # many users behind one address
    nat = Counter(ip for _, ip, _, sc in hits if sc == "benign/nat")
    assert nat and max(nat.values()) > 20


def test_crawler_reads_robots_first_and_respects_it() -> None:
    hits = [h for h in _benign(3) if h[3] == "benign/crawler"]
    assert hits[0][2] == "robots"
    rng = random.Random(3)
    plan = BenignPlan(clients=1, duration=100.0, nat_users=0, flash_users=0, crawlers=1)
    crawl = generate(plan, rng, IpAllocator(random.Random(0)))
    assert not any(h.req.path.startswith(("/account", "/cart", "/api/")) for h in crawl)


def test_benign_hard_cases_are_present(corpus: dict[str, list[Sample]]) -> None:
    benign = b"\n".join(s.to_http() for s in corpus["train"] if s.label == 0)
    text = unquote_plus(benign.decode("utf-8", "replace"))
    hard = ("O'", "select", "union", "<3", "&", "'")
    assert all(h.lower() in text.lower() for h in hard)
    assert any(ord(c) > 0x2FF for c in text)  # non-Latin scripts
    assert b"multipart/form-data" in benign


# --- the built corpus ---------------------------------------------------------------------------


def test_corpus_requests_parse(corpus: dict[str, list[Sample]]) -> None:
    for split, rows in corpus.items():
        assert rows and all(s.split == split for s in rows)
        for s in rows:
            parse_h11(s.to_http())
        assert [s.t for s in rows] == sorted(s.t for s in rows)


def test_splits_are_disjoint_by_source_family_and_client(corpus: dict[str, list[Sample]]) -> None:
    train, test = corpus["train"], corpus["test"]
    pairs = {sp: {(s.source, s.family) for s in rows if s.label} for sp, rows in corpus.items()}
    assert pairs["train"] and pairs["test"]
    assert not pairs["train"] & pairs["test"]
    assert {f for _, f in pairs["test"]} >= {"ssti", "ldap", "prototype_pollution"}
    assert not {s.client for s in train} & {s.client for s in test}


def test_no_attacker_only_artefacts(corpus: dict[str, list[Sample]]) -> None:
    rows = corpus["train"] + corpus["test"]
    benign = [s for s in rows if s.label == 0 and s.source != "benign/attacker"]
    attacks = [s for s in rows if s.label == 1]
    # every attack's user agent (unless the payload is in it) comes from the table benign users
    # draw theirs from, and nearly all are one that a benign user of this small corpus has
    benign_uas = {s.header("User-Agent") for s in benign}
    uas = [s.header("User-Agent") for s in attacks if s.position != "header"]
    assert set(uas) <= set(BROWSER_UAS + APP_UAS)
    assert sum(ua in benign_uas for ua in uas) / len(uas) > 0.75
    # the header layout of every attack occurs in benign traffic
    layouts = {tuple(k for k, _ in s.headers) for s in benign}
    missing = [s for s in attacks if tuple(k for k, _ in s.headers) not in layouts]
    assert not missing, missing[0].to_http()[:400]
    # no fixed attacker addresses: many of them, from the allocator benign users get theirs from
    addrs = {s.client for s in attacks}
    assert len(addrs) >= len(attacks) / 100


def test_addresses_are_unique_and_mixed() -> None:
    alloc = IpAllocator(random.Random(0))
    ips = [alloc.new() for _ in range(5000)]
    assert len(set(ips)) == len(ips)
    v6 = sum(":" in ip for ip in ips) / len(ips)
    assert 0.1 < v6 < 0.2
    assert not any(ip.startswith(("10.", "127.", "192.168.")) for ip in ips)


def test_build_is_deterministic_and_writes_a_manifest(tmp_path: Path) -> None:
    sizes = Sizes(clients=20, duration=300.0, crawler_pages=5)
    m1 = build_corpus(tmp_path / "a", seed=3, sizes=sizes, sources=fixture_sources())
    build_corpus(tmp_path / "b", seed=3, sizes=sizes, sources=fixture_sources())
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    build_corpus(tmp_path / "c", seed=4, sizes=sizes, sources=fixture_sources())
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (
        tmp_path / "c" / "train.jsonl"
    ).read_bytes()
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["holdout_families"] == ["ldap", "ssti", "prototype_pollution"]
    for split in ("train", "test"):
        c = m1["splits"][split]
        assert c["total"] == sum(1 for _ in read_jsonl(tmp_path / "a" / f"{split}.jsonl"))
        assert c["label"]["1"] == sum(c["position"].values())
    assert m1["payloads"]["test"]["fray"].keys() == {"ldap", "prototype_pollution", "ssti"}


def test_jsonl_round_trip_keeps_every_byte(tmp_path: Path) -> None:
    rows = [
        Sample("POST", "/u", (("Host", "h"),), bytes(range(256)), 1, "file_upload", "fray",
               "2001:db8::1", 1.5, "train", "multipart"),
        Sample("GET", "/?q=caf%C3%A9", (("Host", "h"),), "café ☕".encode(), 0, "benign",
               "benign/shop", "198.51.100.7", 0.25, "test"),
    ]  # fmt: skip
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert list(read_jsonl(tmp_path / "x.jsonl")) == rows
    (tmp_path / "bad.jsonl").write_text('{"method": "GET"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        list(read_jsonl(tmp_path / "bad.jsonl"))

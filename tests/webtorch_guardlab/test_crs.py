"""ModSecurity + OWASP CRS baseline: it loads, blocks what CRS blocks, paranoia and threshold count.

Most tests need the libmodsecurity wheel and Debian's modsecurity-crs (see
src/webtorch_guardlab/baselines/README.md) and are skipped, with the reason, where they are missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from webtorch_guardlab.baselines.crs import (
    CRS,
    CRSUnavailable,
    Verdict,
    _without_rules,
    unavailable,
)

REASON = unavailable()
needs_crs = pytest.mark.skipif(
    REASON is not None, reason=f"ModSecurity + OWASP CRS not installed: {REASON}"
)

HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"example.com"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"accept", b"text/html,application/xhtml+xml,*/*;q=0.8"),
]


@pytest.fixture(scope="module")
def pl1() -> Iterator[CRS]:
    crs = CRS(paranoia=1)
    yield crs
    crs.close()


@pytest.fixture(scope="module")
def pl2() -> Iterator[CRS]:
    crs = CRS(paranoia=2)
    yield crs
    crs.close()


def get(crs: CRS, query_value: str, headers: list[tuple[bytes, bytes]] = HEADERS) -> Verdict:
    return crs.inspect("GET", "/search?q=" + quote(query_value, safe=""), headers)


def post(crs: CRS, content_type: bytes, body: bytes) -> Verdict:
    headers = [*HEADERS, (b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    return crs.inspect("POST", "/v2/models/xor/infer", headers, body, client_ip="10.1.2.3")


def assert_blocked_by(verdict: Verdict, rule_id: int) -> None:
    assert verdict.blocked, verdict
    assert verdict.status == 403
    assert rule_id in verdict.rule_ids
    assert verdict.rule_ids[-1] == 949110  # CRS's inbound anomaly score evaluation
    assert verdict.anomaly_score is not None and verdict.anomaly_score >= 5


@needs_crs
@pytest.mark.parametrize("paranoia", [1, 2])
def test_benign_get_passes(paranoia: int, pl1: CRS, pl2: CRS) -> None:
    crs = pl1 if paranoia == 1 else pl2
    assert get(crs, "blue running shoes") == Verdict(
        blocked=False, status=None, anomaly_score=0, rule_ids=()
    )


@needs_crs
def test_sqli_in_query_is_blocked_at_pl1(pl1: CRS) -> None:
    verdict = get(pl1, "1' OR '1'='1")
    assert_blocked_by(verdict, 942100)  # SQL injection detected via libinjection
    assert verdict.anomaly_score == 5


@needs_crs
def test_pl2_scores_the_same_attack_higher(pl1: CRS, pl2: CRS) -> None:
    at_pl1, at_pl2 = get(pl1, "1' OR '1'='1"), get(pl2, "1' OR '1'='1")
    assert at_pl1.anomaly_score is not None and at_pl2.anomaly_score is not None
    assert at_pl2.anomaly_score > at_pl1.anomaly_score
    assert set(at_pl1.rule_ids) < set(at_pl2.rule_ids)


@needs_crs
@pytest.mark.parametrize(
    ("payload", "pl2_rule"),
    [
        ("ORDER BY 1", 942380),  # SQL injection attack (order by probing)
        ("@@version", 942480),  # SQL injection attack (system variable)
        ("'", 942110),  # common injection testing: a lone quote
    ],
)
def test_pl2_catches_what_pl1_lets_through(payload: str, pl2_rule: int, pl1: CRS, pl2: CRS) -> None:
    at_pl1 = get(pl1, payload)
    assert not at_pl1.blocked, at_pl1
    assert at_pl1.anomaly_score == 0
    assert_blocked_by(get(pl2, payload), pl2_rule)


@needs_crs
def test_form_body_injection_is_blocked(pl1: CRS) -> None:
    body = b"user=admin&password=" + quote("' OR 1=1 -- ").encode()
    assert_blocked_by(post(pl1, b"application/x-www-form-urlencoded", body), 942100)
    benign = post(pl1, b"application/x-www-form-urlencoded", b"user=admin&password=hunter2")
    assert benign == Verdict(blocked=False, status=None, anomaly_score=0, rule_ids=())


@needs_crs
def test_json_body_injection_is_blocked(pl1: CRS) -> None:
    attack = orjson.dumps({"inputs": [[0, 1]], "name": "x' UNION SELECT password FROM users--"})
    assert_blocked_by(post(pl1, b"application/json", attack), 942100)
    benign = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32"}]})
    assert post(pl1, b"application/json", benign) == Verdict(False, None, 0, ())


@needs_crs
def test_unparseable_json_body_is_rejected(pl1: CRS) -> None:
    # modsecurity.conf-recommended's rule: a body its parser can't read is refused with 400.
    assert post(pl1, b"application/json", b'{"inputs": [') == Verdict(True, 400, None, (200002,))


@needs_crs
@pytest.mark.parametrize(
    ("name", "value", "rule_id"),
    [
        (b"user-agent", b"() { :; }; /bin/bash -c 'cat /etc/passwd'", 932170),  # shellshock
        (b"user-agent", b"sqlmap/1.7.2#stable (https://sqlmap.org)", 913100),  # scanner
        (b"referer", b"http://example.com/' OR '1'='1", 942100),
        (b"cookie", b"session=1' OR '1'='1", 942100),
    ],
)
def test_header_injection_is_blocked(name: bytes, value: bytes, rule_id: int, pl1: CRS) -> None:
    headers = [(key, val) for key, val in HEADERS if key != name] + [(name, value)]
    assert_blocked_by(pl1.inspect("GET", "/", headers), rule_id)


@needs_crs
def test_threshold_decides_the_block() -> None:
    lenient = CRS(paranoia=1, threshold=10)
    try:
        verdict = get(lenient, "1' OR '1'='1")
    finally:
        lenient.close()
    assert verdict == Verdict(blocked=False, status=None, anomaly_score=5, rule_ids=(942100,))


@needs_crs
def test_setup_and_exclusions_apply(pl1: CRS) -> None:
    assert_blocked_by(pl1.inspect("PUT", "/v2/models/xor", HEADERS), 911100)  # method not allowed
    allowed = "GET HEAD POST OPTIONS PUT DELETE"
    site = CRS(
        paranoia=1,
        setup=f"SecAction \"id:900200,phase:1,nolog,pass,setvar:'tx.allowed_methods={allowed}'\"",
        exclusions="SecRuleRemoveById 942100",
    )
    try:
        assert not site.inspect("PUT", "/v2/models/xor", HEADERS).blocked
        assert not get(site, "1' OR '1'='1").blocked
    finally:
        site.close()


@needs_crs
def test_body_limit_can_be_raised() -> None:
    body = orjson.dumps({"data": "x" * 200_000})  # over the recommended 128 KiB without files
    roomy = CRS(paranoia=1, setup="SecRequestBodyNoFilesLimit 1048576")
    try:
        assert not post(roomy, b"application/json", body).blocked
    finally:
        roomy.close()


def test_missing_rules_are_reported(tmp_path: Path) -> None:
    reason = unavailable(tmp_path)
    assert reason is not None
    with pytest.raises(CRSUnavailable, match=r"not installed|no OWASP CRS rules"):
        CRS(crs_dir=tmp_path)


def test_paranoia_and_threshold_are_checked() -> None:
    with pytest.raises(ValueError, match="paranoia"):
        CRS(paranoia=5)
    with pytest.raises(ValueError, match="threshold"):
        CRS(threshold=0)


def test_without_rules_cuts_the_whole_chain() -> None:
    text = (
        '# keep\nSecRule A "@eq 1" "id:1,phase:1,pass"\n\n'
        '# drop\nSecRule B "@eq 1" \\\n    "id:2,phase:1,pass,chain"\n'
        '    SecRule C "@eq 1" "setvar:tx.x=1"\n\n'
        'SecRule D "@eq 1" "id:21,phase:1,pass"\n'
    )
    kept = _without_rules(text, [2])
    assert "id:1," in kept and "id:21," in kept
    assert "SecRule B" not in kept and "SecRule C" not in kept

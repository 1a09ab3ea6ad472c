"""Issue 19, item 4: the evasions a hostile review found against the shipped detector (payloads
encoded three times or as ``%u``, in a path segment, in User-Agent, Referer or a custom header),
each blocked now, and the benign requests beside them still allowed."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from webtorch.guard.build import DEFAULT_MODEL
from webtorch.guard.features import RequestView, normalise
from webtorch.guard.scorer import Scorer

BLOCK = 0.9986  # the shipped detector's calibrated threshold (config.GuardConfig.block)
HEADERS = [
    (b"host", b"shop"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0"),
    (b"accept", b"text/html"),
]
# Payloads the detector blocks in a query string (the review's reference point).
PAYLOADS = [
    "1' OR '1'='1",
    "' UNION SELECT username, password FROM users--",
    "<script>alert(1)</script>",
    "../../../../etc/passwd",
    "; cat /etc/passwd",
    "1' AND SLEEP(5)--",
]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.from_file(DEFAULT_MODEL)


def injection(scorer: Scorer, view: RequestView) -> float:
    return scorer.score_one(view, [0.0] * 9)[0]


def u_encoded(text: str) -> str:
    return "".join(c if c.isalnum() else f"%u{ord(c):04x}" for c in text)


def test_normalise_decodes_every_layer_up_to_its_bound() -> None:
    assert normalise(b"%2527%20UNION+SELECT") == b"' union select"
    assert normalise(b"%252527%2520OR") == b"' or"  # three layers
    assert normalise(b"%u0027%U003Cscript") == b"'<script"  # IIS's %u
    assert normalise(b"&#39; or &#x27;&quot;&lt;") == b"' or '\"<"  # HTML references
    assert normalise(b"a=1&b=2") == b"a=0&b=0"  # an ordinary query is untouched
    # Bounded: five layers deep, one is left (and the rounds stop there).
    assert normalise(b"%2525252527") == b"%00"  # (digits read as 0)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_triple_and_u_encoded_payloads_are_blocked(scorer: Scorer, payload: str) -> None:
    triple = quote(quote(quote(payload, safe=""), safe=""), safe="")
    assert injection(scorer, RequestView("GET", "/search", "q=" + triple, HEADERS)) >= BLOCK
    u = u_encoded(payload)
    assert injection(scorer, RequestView("GET", "/search", "q=" + u, HEADERS)) >= BLOCK

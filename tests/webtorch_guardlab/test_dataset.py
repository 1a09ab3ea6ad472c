"""The training datasets' augmentation (webtorch_guardlab/dataset.py)."""

from __future__ import annotations

import random

from webtorch_guardlab.dataset import _fresh_cookies


def test_fresh_cookies_redraw_long_values_only() -> None:
    headers = [(b"cookie", b"sid=Ab3dEf9hIj; lang=en; _ga=GA1.1.12345678")]
    ((name, value),) = _fresh_cookies(headers, random.Random(0))
    pairs = dict(p.split("=", 1) for p in value.decode().split("; "))
    assert name == b"cookie" and pairs["lang"] == "en"
    assert pairs["sid"] != "Ab3dEf9hIj" and len(pairs["sid"]) == 10
    assert [c.isdigit() for c in pairs["sid"]] == [c.isdigit() for c in "Ab3dEf9hIj"]
    assert pairs["_ga"].count(".") == 2  # GA1.1.12345678: its punctuation kept

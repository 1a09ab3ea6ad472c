"""The live evaluation's machinery (live.py, live_load.py): its parsers and measures
on made-up data, and a tiny flood against a real ``webtorch serve`` with the token bucket."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from webtorch_guardlab import live, live_load

TINY = live.LiveSettings(
    benign_clients=3,
    control=1.0,
    flood_addresses=5,
    flood_per_address=2,
    flood_start=1.0,
    flood_duration=1.0,
    flood_after=0.5,
    goldeneye=0,
    slow_connections=50,
    slow_rate=50,
    slow_duration=2.0,
    cost_rounds=0,
)


def test_parse_response_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 5\r\nretry-after: 1\r\n\r\n"
    assert live_load.parse_response(head + b"sl") is None
    assert live_load.parse_response(head + b"slow!NEXT") == (429, len(head) + 5, False)
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    assert live_load.parse_response(closing) == (200, len(closing), True)


def test_request_pool_is_varied_and_well_formed() -> None:
    pool = live_load.request_pool(1, 200)
    assert len(set(pool)) > 150
    for raw in pool:
        view = live.view_of_raw(raw)
        assert view.method in ("GET", "POST") and view.path.startswith("/")
        if view.method == "POST":
            assert int(dict(view.headers)[b"content-length"]) == len(view.body)


def test_addresses_are_distinct_loopback_hosts() -> None:
    spread = live.addresses(20, 600)
    assert len(set(spread)) == 600
    assert all(a.startswith("127.20.") and not a.endswith((".0", ".255")) for a in spread)


def test_flood_stats_find_the_first_sustained_refusals() -> None:
    ok, throttled = live_load.OK, live_load.THROTTLED
    bins = [[0] * len(live_load.OUTCOMES) for _ in range(20)]  # 2 s of 0.1 s bins
    for i, b in enumerate(bins):
        b[ok] = 100 if i < 5 else 5
        b[throttled] = 0 if i < 5 else 95
    result = {
        "bin": 0.1,
        "bins": bins,
        "first_refusal": 0.5,
        "served_before": 500,
        "first_throttle": 0.5,
        "served_before_throttle": 500,
    }
    stats = live.flood_stats(result, 2.0)
    assert stats.refused90 == 0.5
    assert stats.served_per_s == pytest.approx((500 + 15 * 5) / 2.0)
    assert stats.refused_share == pytest.approx(15 * 95 / 2000)


def test_benign_stats_count_failures_and_latency() -> None:
    records = [[0.1 * i, 0.001, 200] for i in range(98)]
    records += [[5.0, 5.0, live_load.TIMEOUT], [5.1, 0.002, 403]]
    stats = live.benign_stats(records, 0.0, 10.0)
    assert stats.requests == 100 and stats.ok == 98
    assert stats.statuses == {"timeout": 1, "403": 1}
    assert stats.p50 == 0.001 and stats.p99 == 0.002


def test_merge_section_replaces_only_the_live_section() -> None:
    offline = "# Guard results\n\n## Detection on the corpus\n\nnumbers\n"
    first = live.merge_section(offline, "## Live attacks\n\nold\n")
    assert first.startswith(offline.rstrip()) and first.endswith("## Live attacks\n\nold\n")
    with_tail = first + "\n## Later\n\nkept\n"
    second = live.merge_section(with_tail, "## Live attacks\n\nnew\n")
    assert "old" not in second and "## Live attacks\n\nnew\n" in second
    assert "numbers" in second and second.endswith("## Later\n\nkept\n")
    # An offline-only eval rewrites the file and keeps the live section.
    rewritten = live.carry_live_section(second, "# Guard results\n\n## Detection\n\nnew\n")
    assert rewritten == "# Guard results\n\n## Detection\n\nnew\n\n## Live attacks\n\nnew\n"


def test_config_toml_is_a_valid_config() -> None:
    from webtorch import config as wt_config

    for name in live.COST_CONFIGS:
        cfg = wt_config.from_dict(tomllib.loads(live.config_toml(name, live.LiveSettings())))
        if name == "none":
            assert cfg.guard is None
        else:
            assert cfg.guard is not None and cfg.guard.rate == 20.0
            assert (cfg.guard.model == "none") == (name == "bucket")
            assert cfg.guard.mode == ("monitor" if name == "monitor" else "enforce")


def test_a_tiny_flood_is_throttled_and_benign_clients_are_served(tmp_path: Path) -> None:
    result = live.flood_scenario(TINY, "bucket", tmp_path)
    assert result.control.requests > 0 and result.control.success == 1.0
    assert result.during.requests > 0 and result.during.success == 1.0
    flood = result.flood
    assert flood.first_throttle is not None and flood.first_throttle < 1.0
    assert flood.served_before_throttle is not None
    assert flood.totals["throttled"] > flood.totals["ok"] > 0
    assert result.decisions.get("throttle/rate_limit", 0) > 0
    assert result.responsive
    report = live.live_report(live.LiveResults(TINY, True, floods=[result]), "test")
    assert report.startswith(live.LIVE_HEADING) and "| bucket |" in report


@pytest.mark.skipif(shutil.which("slowhttptest") is None, reason="slowhttptest not installed")
def test_slowloris_from_one_address_meets_the_connection_cap(tmp_path: Path) -> None:
    slug, _, _, duration, command = next(a for a in live.attacks(TINY) if a[0] == "slowloris")
    result = live.tool_scenario(TINY, "bucket", tmp_path, slug, command, duration)
    assert result.responsive and result.benign.success == 1.0
    assert result.decisions.get("throttle/connections", 0) > 0

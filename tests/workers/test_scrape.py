"""The whole server's /metrics from several workers' expositions (workers/scrape.py), sans-IO."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from webtorch.workers.scrape import merge, render

ONE = """\
# HELP webtorch_http_requests_total HTTP requests answered
# TYPE webtorch_http_requests_total counter
webtorch_http_requests_total{method="GET",route="/a",status="200"} 3.0
# HELP webtorch_http_request_duration_seconds Time
# TYPE webtorch_http_request_duration_seconds histogram
webtorch_http_request_duration_seconds_bucket{le="0.1",route="/a"} 2.0
webtorch_http_request_duration_seconds_bucket{le="+Inf",route="/a"} 3.0
webtorch_http_request_duration_seconds_count{route="/a"} 3.0
webtorch_http_request_duration_seconds_sum{route="/a"} 0.5
# HELP webtorch_http_connections Client connections open now
# TYPE webtorch_http_connections gauge
webtorch_http_connections 4.0
# HELP webtorch_upstream_traffic_share Share
# TYPE webtorch_upstream_traffic_share gauge
webtorch_upstream_traffic_share{group="g",upstream="u"} 0.25
# HELP webtorch_worker The worker that answered
# TYPE webtorch_worker gauge
webtorch_worker{pid="100",slot="0"} 1.0
"""

TWO = """\
# HELP webtorch_http_requests_total HTTP requests answered
# TYPE webtorch_http_requests_total counter
webtorch_http_requests_total{method="GET",route="/a",status="200"} 5.0
webtorch_http_requests_total{method="GET",route="/b",status="404"} 1.0
# HELP webtorch_http_request_duration_seconds Time
# TYPE webtorch_http_request_duration_seconds histogram
webtorch_http_request_duration_seconds_bucket{le="0.1",route="/a"} 5.0
webtorch_http_request_duration_seconds_bucket{le="+Inf",route="/a"} 5.0
webtorch_http_request_duration_seconds_count{route="/a"} 5.0
webtorch_http_request_duration_seconds_sum{route="/a"} 0.25
# HELP webtorch_http_connections Client connections open now
# TYPE webtorch_http_connections gauge
webtorch_http_connections 6.0
# HELP webtorch_upstream_traffic_share Share
# TYPE webtorch_upstream_traffic_share gauge
webtorch_upstream_traffic_share{group="g",upstream="u"} 0.75
# HELP webtorch_worker The worker that answered
# TYPE webtorch_worker gauge
webtorch_worker{pid="101",slot="1"} 1.0
"""


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_histograms_and_amounts_are_summed_states_are_the_answering_workers() -> None:
    got = values(render(merge(ONE, [TWO])).decode())
    a = (("method", "GET"), ("route", "/a"), ("status", "200"))
    assert got[("webtorch_http_requests_total", a)] == 8.0
    # A series only the other worker has is in the total too.
    b = (("method", "GET"), ("route", "/b"), ("status", "404"))
    assert got[("webtorch_http_requests_total", b)] == 1.0
    route = (("route", "/a"),)
    assert got[("webtorch_http_request_duration_seconds_bucket", (("le", "0.1"), *route))] == 7.0
    assert got[("webtorch_http_request_duration_seconds_count", route)] == 8.0
    assert got[("webtorch_http_request_duration_seconds_sum", route)] == 0.75
    assert got[("webtorch_http_connections", ())] == 10.0
    # A share is a state: the answering worker's.
    assert got[("webtorch_upstream_traffic_share", (("group", "g"), ("upstream", "u")))] == 0.25
    # Every worker is listed; 1 marks the one that answered.
    assert got[("webtorch_worker", (("pid", "100"), ("slot", "0")))] == 1.0
    assert got[("webtorch_worker", (("pid", "101"), ("slot", "1")))] == 0.0
    assert got[("webtorch_workers", ())] == 2.0


def test_alone_it_is_the_workers_own_exposition_and_the_count() -> None:
    got = values(render(merge(ONE, [])).decode())
    assert {k: v for k, v in got.items() if k[0] != "webtorch_workers"} == values(ONE)
    assert got[("webtorch_workers", ())] == 1.0


def test_the_masters_figures_are_added_and_not_counted_as_a_worker() -> None:
    master = """\
# HELP webtorch_worker_restarts_total Workers started again
# TYPE webtorch_worker_restarts_total counter
webtorch_worker_restarts_total{cause="exited"} 2.0
"""
    got = values(render(merge(ONE, [TWO], master)).decode())
    assert got[("webtorch_worker_restarts_total", (("cause", "exited"),))] == 2.0
    assert got[("webtorch_workers", ())] == 2.0

from webtorch.http.messages import Request
from webtorch.metrics import Histogram, Metrics


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = Histogram((1.0, 2.0, 5.0))
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        hist.record(value)  # the hot path: pending until compacted
    assert hist.buckets() == [("1.0", 2.0), ("2.0", 4.0), ("5.0", 4.0), ("+Inf", 5.0)]
    assert hist.count == 5
    assert hist.total == 12.0


def test_histogram_compacts_in_bulk_and_keeps_recording() -> None:
    hist = Histogram((1.0,))
    record = hist.record
    for _ in range(Histogram.COMPACT_AT):
        hist.observe(0.5)
    assert not hist._pending  # observe compacted when the pending list filled
    record(3.0)  # the bound append survives compaction (same list object)
    assert hist.buckets() == [
        ("1.0", float(Histogram.COMPACT_AT)),
        ("+Inf", Histogram.COMPACT_AT + 1.0),
    ]


def test_metrics_exposition_counts_requests_by_route_and_status() -> None:
    metrics = Metrics()
    request = Request("POST", "/models/xor/predict", "", [], b"", route="/models/xor/predict")
    metrics.observe_request(request, 200, 0.002)
    metrics.observe_request(request, 400, 0.0001)
    text = metrics.exposition().decode()
    assert (
        'webtorch_http_requests_total{method="POST",route="/models/xor/predict",status="200"} 1.0'
        in text
    )
    assert 'webtorch_http_request_duration_seconds_count{route="/models/xor/predict"} 2.0' in text
    assert (
        'webtorch_http_request_duration_seconds_bucket{le="0.0001",route="/models/xor/predict"} 1.0'
        in text
    )


def test_body_bytes_are_counted_by_route_once_sent() -> None:
    from tests.conftest import serve_in_thread, xor_config
    from tests.proxy.test_forward import request

    with serve_in_thread(xor_config()) as running:
        body = b'{"inputs": [[0, 1], [1, 1]]}'
        answers = [request(running, "POST", "/models/xor/predict", body)[2] for _ in range(3)]
        assert request(running, "HEAD", "/v2")[0] == 200  # HEAD: no body goes out
        _, _, scrape = request(running, "GET", "/metrics")
    text = scrape.decode()
    route = 'route="/models/xor/predict"'
    sent = sum(len(a) for a in answers)
    assert f"webtorch_http_response_body_bytes_total{{{route}}} {float(sent)}" in text
    assert f"webtorch_http_request_body_bytes_total{{{route}}} {3.0 * len(body)}" in text
    assert 'webtorch_http_response_body_bytes_total{route="/v2"} 0.0' in text

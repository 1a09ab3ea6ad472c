"""Cost of one ModSecurity + CRS inspection, per request kind and paranoia level.

    taskset -c 0 python -m webtorch_guardlab.baselines.bench_crs [-n 10000]

Prints the cost of one inspection (CPU time per request, then wall-clock mean, p50 and p99) for
benign and attack requests, each a GET with a query and a POST with a JSON body, with the headers
a browser would send.
"""

from __future__ import annotations

import argparse
import statistics
import time
from urllib.parse import quote

import orjson

from webtorch_guardlab.baselines.crs import CRS, unavailable

_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"example.com"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"accept-language", b"en-US,en;q=0.5"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"cookie", b"session=3f2a9c1e7b; theme=dark"),
]


def _get(query: str) -> tuple[str, str, list[tuple[bytes, bytes]], bytes]:
    return ("GET", "/search?q=" + quote(query, safe="") + "&page=2", _HEADERS, b"")


def _post(document: object) -> tuple[str, str, list[tuple[bytes, bytes]], bytes]:
    body = orjson.dumps(document)
    headers = [
        *_HEADERS,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return ("POST", "/v2/models/xor/infer", headers, body)


REQUESTS = {
    "benign GET": _get("blue running shoes"),
    "benign POST json": _post(
        {"inputs": [{"name": "x", "shape": [4, 2], "datatype": "FP32", "data": [0, 1] * 4}]}
    ),
    "attack GET sqli": _get("1' OR '1'='1"),
    "attack POST json sqli": _post({"inputs": [], "name": "x' UNION SELECT password FROM users--"}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=10_000, help="requests per kind (default 10000)")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        raise SystemExit(f"CRS unavailable: {reason}")
    for paranoia in (1, 2):
        started = time.perf_counter()
        crs = CRS(paranoia)
        loaded = time.perf_counter() - started
        print(f"PL{paranoia}: rules loaded in {loaded * 1e3:.0f} ms")
        for name, request in REQUESTS.items():
            verdict = crs.inspect(*request)
            times = []
            cpu_started = time.process_time_ns()
            for _ in range(args.n):
                t0 = time.perf_counter_ns()
                crs.inspect(*request)
                times.append(time.perf_counter_ns() - t0)
            cpu = (time.process_time_ns() - cpu_started) / args.n
            times.sort()
            print(
                f"  {name:22} blocked={verdict.blocked!s:5} score={verdict.anomaly_score!s:>3}  "
                f"cpu {cpu / 1e3:6.0f} us  mean {statistics.fmean(times) / 1e3:6.0f} us  "
                f"p50 {times[len(times) // 2] / 1e3:6.0f} us  "
                f"p99 {times[len(times) * 99 // 100] / 1e3:6.0f} us"
            )
        crs.close()


if __name__ == "__main__":
    main()

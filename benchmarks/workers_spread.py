"""How evenly the two ways of sharing a port spread wrk's connections across workers.

    .venv/bin/python benchmarks/workers_spread.py [--workers 2] [--connections 8,64]
        [--duration 5] [--rounds 3]

For each ``[server.master] listen_socket`` ("reuseport": a socket per worker, the kernel hashes
each connection to one; "shared": one listening socket every worker accepts from), and each
connection count, a fresh ``webtorch serve`` with ``workers = N`` and one fixed route runs wrk for
``--duration`` seconds, ``--rounds`` times (a round is a fresh server: which worker a connection
lands on is decided when wrk connects). Per worker it reads the requests it answered and the
connections it accepted from its own /metrics (reached by new connections until every worker has
answered one), and its CPU seconds from /proc. The spread is the busiest worker's share of the
requests (1/N is perfect); the table prints each round's.

Neither the servers nor wrk are pinned: on a 2-core machine they share both cores (and with
whatever else runs), which is what deployment looks like; the spread, not the throughput, is
what this measures.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import webtorch_harness as harness

WORKER = re.compile(r'webtorch_worker\{pid="(\d+)",slot="(\d+)"\} 1\.0')
REQUESTS = re.compile(r'webtorch_http_requests_total\{[^}]*route="/hello"[^}]*\} ([\d.e+]+)')
ACCEPTED = re.compile(r"^webtorch_http_connections_accepted_total ([\d.e+]+)", re.MULTILINE)

CONFIG = """
[server]
listen = "127.0.0.1:0"
workers = {workers}

[server.master]
listen_socket = "{mode}"

[[routes]]
path = "/hello"
return = 200
body = "hello"
"""


def per_worker(server: harness.Server, count: int) -> dict[int, tuple[int, int]]:
    """pid -> (requests to /hello, connections accepted), each worker's own /metrics."""
    found: dict[int, tuple[int, int]] = {}
    deadline = time.monotonic() + 30
    while len(found) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: reached only workers {sorted(found)}")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
        finally:
            conn.close()
        worker = WORKER.search(body)
        requests = REQUESTS.search(body)
        accepted = ACCEPTED.search(body)
        assert worker is not None and accepted is not None, body[:300]
        pid = int(worker[1])
        if pid not in found:
            # This scrape's own connection is counted: take it off.
            found[pid] = (int(float(requests[1])) if requests else 0, int(float(accepted[1])) - 1)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", default="8,64")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("error: wrk is not installed; run benchmarks/setup")
    print(
        "| listen_socket | connections | round | req/s | requests per worker | "
        "connections per worker | CPU s per worker | busiest worker's share |"
    )
    print("|---|---:|---:|---:|---|---|---|---:|")
    for mode in ("reuseport", "shared"):
        for connections in [int(c) for c in args.connections.split(",")]:
            for round_ in range(1, args.rounds + 1):
                with tempfile.TemporaryDirectory() as tmp:
                    toml = CONFIG.format(workers=args.workers, mode=mode)
                    with harness.serve(toml=toml, workdir=Path(tmp)) as server:
                        workers = [p for p in server.pids() if p != server.pid]
                        cpu0 = {p: harness.cpu_times([p]).total for p in workers}
                        done = subprocess.run(
                            [wrk, "-t1", f"-c{connections}", f"-d{args.duration}s",
                             f"{server.url}/hello"],
                            capture_output=True, text=True, check=True,
                        )  # fmt: skip
                        cpu = {p: harness.cpu_times([p]).total - cpu0[p] for p in workers}
                        counts = per_worker(server, args.workers)
                rate = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
                total = sum(r for r, _ in counts.values()) or 1
                order = sorted(counts)
                print(
                    f"| {mode} | {connections} | {round_} | {float(rate[1]) if rate else 0:,.0f} "
                    f"| {' / '.join(str(counts[p][0]) for p in order)} "
                    f"| {' / '.join(str(counts[p][1]) for p in order)} "
                    f"| {' / '.join(f'{cpu.get(p, 0):.2f}' for p in order)} "
                    f"| {max(r for r, _ in counts.values()) / total:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

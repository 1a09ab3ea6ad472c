"""State shared by the workers of one server (issue 22 part 3), as processes: a master and two
workers on one port, a keep-alive connection to each. A client's token bucket, a ban and an
upstream taken out of rotation hold in both workers whichever one made them. No clock is
waited on: the bucket refills at 0.001/s, the ban and the mark last 10 minutes."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import webtorch_harness as harness
from tests.proxy.upstreams import upstreams
from tests.workers.test_workers import config, one_per_worker, pids

INJECTION = "/v2?q=" + quote("1' OR '1'='1", safe="")

BENIGN = "/v2?page=1"

Connections = list[http.client.HTTPConnection]


@contextmanager
def two_workers(tmp_path: Path, extra: str) -> Iterator[Connections]:
    """A connection to each of two workers, clients named by X-Forwarded-For."""
    text = config(extra=extra).replace(
        "workers = 2\n", 'workers = 2\ntrusted_proxies = ["127.0.0.1"]\n', 1
    )
    with harness.serve(toml=text, workdir=tmp_path) as server:
        workers = set(pids(server).values())
        assert len(workers) == 2
        with one_per_worker(server, workers) as conns:
            yield list(conns.values())


def status(conn: http.client.HTTPConnection, path: str, client: str) -> int:
    conn.request("GET", path, headers={"X-Forwarded-For": client})
    response = conn.getresponse()
    response.read()
    return response.status


def test_a_clients_rate_limit_holds_across_workers(tmp_path: Path) -> None:
    # A bucket of 20 that does not refill within the test: 25 requests to each worker, taken in
    # turns, admit 20 in all (each worker with a bucket of its own would admit 40).
    guard = """
[guard]
mode = "enforce"
model = "none"
rate = 0.001
burst = 20
"""
    with two_workers(tmp_path, guard) as conns:
        answers = [status(conn, "/hello", "3.3.3.3") for _ in range(25) for conn in conns]
    assert answers.count(200) == 20
    assert answers.count(429) == 30
    assert answers[:20] == [200] * 20  # both workers spent the one bucket, in turn


def test_a_ban_made_in_one_worker_is_enforced_by_the_other(tmp_path: Path) -> None:
    guard = """
[guard]
mode = "enforce"
ban_seconds = 600
"""
    with two_workers(tmp_path, guard) as (first, second):
        # (A page the shipped detector takes as benign: it throttles a bare "/hello" as a
        # scanner's probe.)
        assert status(second, BENIGN, "1.1.1.1") == 200
        assert status(first, INJECTION, "1.1.1.1") == 403  # blocked and banned, by the first
        assert status(second, BENIGN, "1.1.1.1") == 403  # refused by the other: banned
        assert status(second, BENIGN, "2.2.2.2") == 200  # and only that client
        assert status(first, BENIGN, "1.1.1.1") == 403
        second.request("GET", "/metrics")
        metrics = second.getresponse().read().decode()
    # What the shared tables forgot (nothing) and the locks taken over (none), in /metrics.
    assert "\nwebtorch_shared_evicted 0.0\n" in metrics
    assert "\nwebtorch_shared_locks_taken_over_total 0.0\n" in metrics


def test_an_upstream_taken_out_by_one_worker_is_avoided_by_the_other(
    tmp_path: Path, refused_address: str
) -> None:
    dead = refused_address
    with upstreams("b") as (alive,):
        # Round robin over a dead upstream and a live one, no retries: an attempt at the dead
        # one is a 502. One failure takes it out for 10 minutes (passive health).
        group = f"""
[upstreams.pair]
servers = ["{dead}", "{alive.address}"]
policy = "round_robin"
max_fails = 1
fail_timeout = 600
retry = {{ tries = 1 }}

[[routes]]
path = "/up"
upstream = "pair"
"""
        with two_workers(tmp_path, group) as (first, second):
            seen = [status(first, "/up", "5.5.5.5") for _ in range(2)]
            assert sorted(seen) == [200, 502]  # the first worker tried both: the dead one is out
            hits = alive.hits["/up"]
            # The second worker never tried the dead one: it was out before its first request.
            assert [status(second, "/up", "5.5.5.5") for _ in range(10)] == [200] * 10
            assert alive.hits["/up"] == hits + 10

"""``/dashboard/stats`` from any worker is the whole server's (workers/board.py), as processes:
a master and two workers, each serving its own keep-alive connection's requests."""

from __future__ import annotations

import json
from typing import Any

from tests.workers.test_workers import get, one_per_worker, pids, poll, two
from webtorch_harness import Server

__all__ = ["two"]  # the fixture, used by name


def test_the_dashboard_from_either_worker_shows_both_workers_requests(two: Server) -> None:
    workers = pids(two)
    with one_per_worker(two, set(workers.values())) as conns:
        sent = {pid: 3 + 4 * slot for slot, pid in workers.items()}  # 3 and 7
        for pid, conn in conns.items():
            for _ in range(sent[pid]):
                assert get(conn, "/hello") == (200, b"v1")

        def stats() -> dict[int, dict[str, Any]] | None:
            # Each worker's answer, once it lists both workers with at least what each served
            # (a worker's published totals are at most a second old).
            answers = {}
            for pid, conn in conns.items():
                status, body = get(conn, "/dashboard/stats")
                assert status == 200
                answer = json.loads(body)
                served = {w["pid"]: w["requests"] for w in answer["workers"]}
                if set(served) != set(sent) or any(served[p] < n for p, n in sent.items()):
                    return None
                answers[pid] = answer
            return answers

        answers = poll(stats, "both workers' requests in each worker's dashboard")
        # The page polls with ?since=: a second is numbered alike by every worker (wall clock),
        # so a poll that reaches the other worker asks for what it lacks.
        newest = {pid: answer["seq"] for pid, answer in answers.items()}
        assert abs(newest[min(newest)] - newest[max(newest)]) <= 2
        for pid, answer in answers.items():
            assert answer["workers"][0]["pid"] == pid  # the answering worker first
            samples = answer["samples"]
            assert samples and [s["seq"] for s in samples] == sorted({s["seq"] for s in samples})
            # Every merged second sums its workers' rates and names each worker.
            for sample in samples:
                shown = sample["workers"]
                assert {w["pid"] for w in shown.values()} <= set(sent)
                total = sum(w["rate"] for w in shown.values())
                assert abs(sample["requests"]["rate"] - total) < 0.01
            assert any(len(s["workers"]) == 2 for s in samples)
            later = json.loads(get(conns[pid], f"/dashboard/stats?since={answer['seq']}")[1])
            assert all(s["seq"] > answer["seq"] for s in later["samples"])

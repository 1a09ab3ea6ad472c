"""What the whole server's dashboard (webtorch/workers/board.py) costs a worker of
``server.workers > 1``: once a second, after the timeline's sample, publishing it and merging the
others' newest; per poll of ``/dashboard/stats``, merging the others' present state. Off the
request path: nothing here runs per request, and one process (workers = 1) runs none of it.

    PYTHONPATH=$PWD/src taskset -c 0 .venv/bin/python benchmarks/dashboard_workers.py
        [--workers 2 8] [--groups 3] [--servers 4] [--models 2]

The workers are simulated in this process (one Board per slot over one /dev/shm directory, as the
master makes it), each with ``--groups`` upstream groups of ``--servers`` servers and ``--models``
models in its present state, and a timeline that has taken 300 samples (the ring full). Best of
5 repeats.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import timeit
from pathlib import Path
from typing import Any

from webtorch.metrics import Metrics
from webtorch.observe.timeline import HISTORY, Timeline
from webtorch.workers.board import Board


def present(groups: int, servers: int, models: int) -> dict[str, Any]:
    return {
        "upstreams": {
            f"g{g}": {
                "policy": "round_robin",
                "retries": 0,
                "prediction_error": None,
                "train_steps": None,
                "servers": [
                    {"address": f"10.0.0.{i}:80", "weight": 1, "state": "healthy", "inflight": 2}
                    for i in range(servers)
                ],
            }
            for g in range(groups)
        },
        "models": {f"m{i}": {"trainable": True, "steps": 10, "loss": 0.1} for i in range(models)},
        "guard": None,
        "pipelines": {},
    }


def best(call: Any, number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--models", type=int, default=2)
    args = parser.parse_args()
    state = present(args.groups, args.servers, args.models)
    print("| workers | per second: sample alone (us) | + publish and merge (us) | "
          "per poll, newest sample (us) | per poll, all 300 (us) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for count in args.workers:
        directory = Path(tempfile.mkdtemp(prefix="webtorch-board-", dir="/dev/shm"))
        try:
            alone = Timeline(Metrics(), lambda: None, lambda: 3)
            boards = []
            for slot in range(count):
                timeline = Timeline(Metrics(), lambda: None, lambda: 3)
                boards.append(Board(timeline, lambda: state, directory, slot, count))
                timeline.sample()
            board = boards[0]
            for _ in range(HISTORY):
                board.timeline.sample()
            sample = best(alone.sample, 2000)
            merged = best(board.timeline.sample, 2000)
            newest = best(lambda b=board: b.body(b.seq - 1), 2000)
            whole = best(lambda b=board: b.body(0), 500)
            print(
                f"| {count} | {sample * 1e6:.0f} | {merged * 1e6:.0f} | {newest * 1e6:.0f} "
                f"| {whole * 1e6:.0f} |"
            )
        finally:
            shutil.rmtree(directory)


if __name__ == "__main__":
    main()

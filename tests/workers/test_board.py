"""The whole server's dashboard from several workers' published samples (workers/board.py),
sans-IO, and the shell's publishing and merging over a real directory with fake clocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from webtorch.metrics import Metrics
from webtorch.observe.timeline import QUANTILES, Timeline
from webtorch.workers.board import Board, merge_current, merge_samples


def server(rate: float, errors: float, latency: float | None, state: str) -> dict[str, Any]:
    share = 0.0
    return {
        "rate": rate,
        "share": share,
        "inflight": 1,
        "latency": latency,
        "errors": errors,
        "state": state,
    }


def published(slot: int, rate: float, latencies: list[float], **parts: Any) -> dict[str, Any]:
    quantiles = [float(v) for v in np.percentile(latencies, QUANTILES)] if latencies else []
    sample = {
        "seq": 9,
        "t": 100.0 + slot,
        "requests": {
            "rate": rate,
            "errors": 1.0,
            "client_errors": 0.0,
            "p50": None,
            "p90": None,
            "p99": None,
        },
        "connections": 2,
        "upstreams": parts.get("upstreams", {}),
        "models": parts.get("models", {}),
        "guard": parts.get("guard"),
    }
    return {
        "slot": slot,
        "pid": 10 + slot,
        "started": 5.0 + slot,
        "requests": 0,
        "sample": sample,
        "latency": [len(latencies), quantiles],
    }


def test_rates_are_summed_and_percentiles_weigh_each_workers_count() -> None:
    fast = published(0, 30.0, [0.001] * 900)
    slow = published(1, 10.0, [0.1] * 100)
    merged = merge_samples([fast, slow], seq=123)
    assert merged["seq"] == 123 and merged["t"] == 100.0  # the answering worker's time
    requests = merged["requests"]
    assert (requests["rate"], requests["errors"], merged["connections"]) == (40.0, 2.0, 4)
    # 90% of the requests took 1 ms: the median is 1 ms, the 99th percentile 100 ms.
    assert requests["p50"] == 0.001 and requests["p99"] == 0.1
    assert merged["workers"] == {
        "0": {"pid": 10, "rate": 30.0, "errors": 1.0, "connections": 2},
        "1": {"pid": 11, "rate": 10.0, "errors": 1.0, "connections": 2},
    }
    idle = merge_samples([published(0, 0.0, []), published(1, 0.0, [])], seq=1)
    assert idle["requests"]["p50"] is None


def test_upstream_shares_come_from_the_summed_attempts_states_from_the_answering_worker() -> None:
    def group(a: float, b: float, state: str) -> dict[str, Any]:
        return {
            "g": {
                "servers": {"a": server(a, 0.0, 0.01, state), "b": server(b, 1.0, 0.03, "healthy")},
                "reasons": {"picked": a + b},
                "predicted": None,
                "observed": None,
            }
        }

    one = published(0, 1.0, [], upstreams=group(30.0, 10.0, "ejected"))
    two = published(1, 1.0, [], upstreams=group(10.0, 50.0, "healthy"))
    servers = merge_samples([one, two], seq=1)["upstreams"]["g"]["servers"]
    assert servers["a"]["rate"] == 40.0 and servers["b"]["rate"] == 60.0
    assert servers["a"]["share"] == 0.4 and servers["b"]["share"] == 0.6
    assert servers["a"]["state"] == "ejected" and servers["b"]["errors"] == 2.0
    assert servers["a"]["inflight"] == 2
    assert merge_samples([one, two], seq=1)["upstreams"]["g"]["reasons"] == {"picked": 100.0}


def test_models_sum_rates_and_take_the_trainers_loss() -> None:
    def model(rate: float, batch: float | None, steps: float, loss: float | None) -> Any:
        return {
            "m": {
                "rate": rate,
                "rows": rate,
                "batch": batch,
                "train_steps": steps,
                "train_rows": steps * 4,
                "loss": loss,
            }
        }

    reader = published(0, 1.0, [], models=model(40.0, 4.0, 0.0, 0.9))  # a stale loss
    trainer = published(1, 1.0, [], models=model(20.0, 2.0, 5.0, 0.25))
    merged = merge_samples([reader, trainer], seq=1)["models"]["m"]
    assert merged["rate"] == 60.0 and merged["train_steps"] == 5.0 and merged["loss"] == 0.25
    assert merged["batch"] == 60.0 / (10 + 10)  # rows over batches, each worker's batches


def test_current_state_sums_amounts_and_keeps_the_answering_workers_states() -> None:
    def current(inflight: int, steps: int, blocked: dict[str, int], stage_rows: int) -> Any:
        return {
            "upstreams": {
                "g": {
                    "policy": "round_robin",
                    "retries": 1,
                    "prediction_error": None,
                    "train_steps": None,
                    "servers": [
                        {"address": "a", "weight": 1, "state": "healthy", "inflight": inflight}
                    ],
                }
            },
            "models": {"m": {"trainable": True, "steps": steps, "loss": steps / 10}},
            "guard": {
                "mode": "enforce",
                "bans": 3,
                "clients": 5,
                "top_blocked": [{"client": c, "blocked": n} for c, n in blocked.items()],
            },
            "pipelines": {
                "p": [
                    {
                        "stage": "s",
                        "requests": 1,
                        "seconds": 0.5,
                        "wait": 0.1,
                        "batches": 1,
                        "rows": stage_rows,
                        "errors": 0,
                        "bytes_in": 1,
                        "bytes_out": 2,
                    }
                ]
            },
        }

    merged = merge_current([current(2, 0, {"x": 1}, 3), current(5, 7, {"x": 2, "y": 9}, 4)])
    assert merged["upstreams"]["g"]["servers"][0]["inflight"] == 7
    assert merged["models"]["m"] == {"trainable": True, "steps": 7, "loss": 0.7}
    guard = merged["guard"]
    assert (guard["bans"], guard["clients"]) == (3, 10)  # bans: shared, already the server's
    assert guard["top_blocked"] == [{"client": "y", "blocked": 9}, {"client": "x", "blocked": 3}]
    assert merged["pipelines"]["p"][0]["rows"] == 7


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_each_worker_publishes_and_merges_the_others_newest_leaving_out_stale_ones(
    tmp_path: Path,
) -> None:
    clock = Clock(1000.0)
    boards = []
    for slot in range(2):
        metrics = Metrics()
        timeline = Timeline(metrics, lambda: None, lambda: 1, clock=clock, monotonic=clock)
        boards.append(Board(timeline, _empty, tmp_path, slot, 2, clock=clock))
    one, two = boards
    one.timeline.sample()  # worker 1 has not published yet
    assert one.samples[-1]["workers"].keys() == {"0"} and one.seq == 1000
    two.timeline.sample()
    assert two.samples[-1]["workers"].keys() == {"0", "1"}
    clock.now += 1.0
    one.timeline.sample()
    assert [s["seq"] for s in one.samples] == [1000, 1001]
    assert one.body(1000)["samples"] == [one.samples[-1]]
    assert [w["slot"] for w in one.body(0)["workers"]] == [0, 1]
    clock.now += 10.0  # worker 1 stopped publishing: its last sample is not counted as now
    one.timeline.sample()
    assert one.samples[-1]["workers"].keys() == {"0"}
    assert one.body(0)["started"] == 1000.0
    # A file that does not read as a worker's (torn by hand, another version) is left out, and
    # the tick that merges goes on.
    two.path(1).write_bytes(b'{"sample": {"t": 1011.0}, "latency": 7}')
    one.timeline.sample()
    two.path(1).write_bytes(b"not json")
    one.timeline.sample()
    assert one.samples[-1]["workers"].keys() == {"0"} and one.seq == 1013
    two.timeline.sample()  # a fresh, whole one again
    assert one.body(0)["workers"][1]["slot"] == 1
    published = orjson.loads(two.path(1).read_bytes())
    two.path(1).write_bytes(orjson.dumps({**published, "current": {}}))
    assert [w["slot"] for w in one.body(0)["workers"]] == [0]


def _empty() -> dict[str, Any]:
    return {"upstreams": {}, "models": {}, "guard": None, "pipelines": {}}

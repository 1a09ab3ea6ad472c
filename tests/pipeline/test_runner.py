"""The runner with placements the test drives: batches cut per stage up to max_batch, each
request given its own rows, failures narrowed to the record, a slow stage holding only itself.
The loop runs one turn at a time (``turn``): no sleeps, no timing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from webtorch.http.messages import Response
from webtorch.metrics import StageStats
from webtorch.pipeline.graph import Graph
from webtorch.pipeline.placement import Done
from webtorch.pipeline.runner import Call, PipelineRunner, Runner, StageRunner
from webtorch.pipeline.spec import Pipeline, Reject, Stage


class Manual:
    """A placement whose batches wait until the test finishes them."""

    kind = "manual"

    def __init__(self, fn: Callable[[Any], Any], concurrency: int = 1) -> None:
        self.fn = fn
        self.concurrency = concurrency
        self.pending: list[tuple[Any, Done]] = []
        self.batches: list[Any] = []

    def run(self, batch: Any, done: Done) -> None:
        self.batches.append(batch)
        self.pending.append((batch, done))

    def finish(self, index: int = 0) -> None:
        batch, done = self.pending.pop(index)
        try:
            result = self.fn(batch)
        except Exception as exc:
            done(None, exc)
        else:
            done(result, None)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"placement": self.kind}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def turn(loop: asyncio.AbstractEventLoop) -> None:
    """Run what is ready on the loop now (one pass), then return."""
    loop.call_soon(loop.stop)
    loop.run_forever()


def make(
    loop: asyncio.AbstractEventLoop,
    stages: list[tuple[Stage, Manual]],
    max_batch: int = 4,
) -> tuple[PipelineRunner, Graph]:
    graph = Graph(Pipeline([s for s, _ in stages]))
    runners: dict[str, Runner] = {
        s.name: StageRunner(s, p, StageStats(), loop, max_batch=max_batch) for s, p in stages
    }
    return PipelineRunner("p", runners), graph


def answer(call: Call, result: Any) -> Response:
    return Response(200, orjson.dumps(result))


def body(call: Call) -> Any:
    assert call.response is not None
    return orjson.loads(call.response.body)


def test_requests_merge_up_to_max_batch_and_each_gets_its_rows(
    loop: asyncio.AbstractEventLoop,
) -> None:
    double = Manual(lambda rows: [r * 2 for r in rows])
    runner, graph = make(loop, [(Stage("double", double.fn), double)])
    plan = graph.plan()
    a = runner.submit(plan, [1, 2], 2, answer)
    turn(loop)
    assert double.batches == [[1, 2]]  # alone: no wait for a batch to fill
    b = runner.submit(plan, [3], 1, answer)
    c = runner.submit(plan, [4, 5], 2, answer)
    d = runner.submit(plan, [6, 7], 2, answer)
    turn(loop)
    assert len(double.pending) == 1  # one batch at a time on a one-wide placement
    double.finish()
    turn(loop)
    assert double.batches[1] == [3, 4, 5]  # b and c: d would pass max_batch 4
    double.finish()
    turn(loop)
    assert double.batches[2] == [6, 7]
    double.finish()
    assert [body(x) for x in (a, b, c, d)] == [[2, 4], [6], [8, 10], [12, 14]]
    stats = runner.stages["double"].stats
    assert stats.batches == 3 and stats.rows == 7
    assert stats.batch_rows.count == 3 and stats.batch_rows.total == 7
    assert a.response is not None
    assert a.response.headers[-1] != (b"server-timing", b"")
    assert a.response.headers[-1][0] == b"server-timing"


def test_a_wider_placement_runs_batches_side_by_side(loop: asyncio.AbstractEventLoop) -> None:
    slow = Manual(lambda rows: rows, concurrency=2)
    runner, graph = make(loop, [(Stage("slow", slow.fn), slow)], max_batch=1)
    plan = graph.plan()
    first = runner.submit(plan, ["a"], 1, answer)
    turn(loop)
    second = runner.submit(plan, ["b"], 1, answer)
    turn(loop)
    assert len(slow.pending) == 2
    slow.finish(1)  # the second overtakes the first, which is still running
    assert body(second) == ["b"] and first.response is None
    slow.finish()
    assert body(first) == ["a"]


def test_a_slow_stage_holds_only_its_own_queue(loop: asyncio.AbstractEventLoop) -> None:
    first = Manual(lambda rows: rows)
    second = Manual(lambda rows: [r.upper() for r in rows])
    runner, graph = make(
        loop, [(Stage("first", first.fn), first), (Stage("second", second.fn), second)]
    )
    plan = graph.plan()
    a = runner.submit(plan, ["a"], 1, answer)
    turn(loop)
    first.finish()  # a moves on to the second stage, which now holds it
    turn(loop)
    b = runner.submit(plan, ["b"], 1, answer)
    turn(loop)
    first.finish()  # the first stage keeps working while the second is busy
    assert len(second.pending) == 1 and len(runner.stages["second"].queue) == 1
    second.finish()
    turn(loop)
    second.finish()
    assert (body(a), body(b)) == (["A"], ["B"])


def test_a_raising_batch_is_narrowed_to_the_request_then_the_record(
    loop: asyncio.AbstractEventLoop,
) -> None:
    def picky(rows: list[str]) -> list[Any]:
        if "boom" in rows:
            raise ValueError("boom")
        return [r if r else Reject("empty") for r in rows]

    stage = Manual(picky)
    runner, graph = make(loop, [(Stage("picky", picky), stage)], max_batch=8)
    plan = graph.plan()
    calls = [
        runner.submit(plan, ["x"], 1, answer),
        runner.submit(plan, ["y", "boom", "z"], 3, answer),
        runner.submit(plan, ["ok", ""], 2, answer),
    ]
    turn(loop)
    while stage.pending:
        stage.finish()
        turn(loop)
    assert calls[0].response is not None and calls[0].response.status == 200
    assert body(calls[0]) == ["x"]
    failed = calls[1].response
    assert failed is not None and failed.status == 500
    assert body(calls[1])["record"] == 1 and body(calls[1])["stage"] == "picky"
    rejected = calls[2].response
    assert rejected is not None and rejected.status == 422
    assert body(calls[2])["error"] == "stage 'picky' rejected record 1: empty"


def test_wrong_row_counts_are_the_stages_fault(loop: asyncio.AbstractEventLoop) -> None:
    lossy = Manual(lambda rows: rows[:1])
    runner, graph = make(loop, [(Stage("lossy", lossy.fn), lossy)])
    call = runner.submit(graph.plan(), ["a", "b"], 2, answer)
    turn(loop)
    while lossy.pending:
        lossy.finish()
        turn(loop)
    assert call.response is not None and call.response.status == 500
    assert "lossy" in body(call)["error"]


def test_fan_out_and_join(loop: asyncio.AbstractEventLoop) -> None:
    stages = [
        Stage("words", lambda rows: [r.split() for r in rows]),
        Stage("count", lambda rows: [len(r) for r in rows], after=("words",)),
        Stage("first", lambda rows: [r[0] for r in rows], after=("words",)),
        Stage(
            "join",
            lambda j: [f"{f}:{c}" for f, c in zip(j["first"], j["count"], strict=True)],
            after=("count", "first"),
        ),
    ]
    placements = [(s, Manual(s.fn)) for s in stages]  # type: ignore[arg-type]
    runner, graph = make(loop, placements)
    call = runner.submit(graph.plan(), ["a b c", "d e"], 2, answer)
    for _ in range(8):
        turn(loop)
        for _, placement in placements:
            while placement.pending:
                placement.finish()
    assert body(call) == ["a:3", "d:2"]
    assert call.response is not None
    timing = dict(h for h in call.response.headers)[b"server-timing"].decode()
    assert [e.split(";")[0] for e in timing.split(", ")] == ["words", "count", "first", "join"]


def test_an_unavailable_placement_answers_its_batch_at_once(
    loop: asyncio.AbstractEventLoop,
) -> None:
    from webtorch.errors import HTTPError, ServiceUnavailable

    def down(rows: list[Any]) -> list[Any]:
        raise ServiceUnavailable("the group has no server up")

    def broken(rows: list[Any]) -> list[Any]:
        raise HTTPError("the remote stage failed on a record")  # a 500: narrowed down

    # 503: no reruns; 500: per request, then the failing request's rows until one fails.
    for fn, status, runs in ((down, 503, 1), (broken, 500, 1 + 2 + 1)):
        stage = Manual(fn)
        runner, graph = make(loop, [(Stage("far", fn), stage)])
        calls = [runner.submit(graph.plan(), ["a", "b"], 2, answer)]
        calls.append(runner.submit(graph.plan(), ["c"], 1, answer))
        turn(loop)
        while stage.pending:
            stage.finish()
            turn(loop)
        assert [c.response.status for c in calls if c.response is not None] == [status] * 2
        assert len(stage.batches) == runs
        assert body(calls[0])["stage"] == "far"


class Sync(Manual):
    """A placement that finishes each batch inside run(), as the loop placement does."""

    def run(self, batch: Any, done: Done) -> None:
        self.batches.append(batch)
        try:
            result = self.fn(batch)
        except Exception as exc:
            done(None, exc)
        else:
            done(result, None)


def test_narrowing_a_big_batch_on_the_loop_does_not_nest(loop: asyncio.AbstractEventLoop) -> None:
    def picky(rows: list[str]) -> list[str]:
        if "boom" in rows:
            raise ValueError("boom")
        return rows

    stage = Sync(picky)
    runner, graph = make(loop, [(Stage("picky", picky), stage)], max_batch=512)
    plan = graph.plan()
    calls = [runner.submit(plan, [f"r{i}", f"s{i}"], 2, answer) for i in range(255)]
    calls.append(runner.submit(plan, ["fine", "boom"], 2, answer))
    for _ in range(1000):
        turn(loop)
        if all(c.response is not None for c in calls):
            break
    statuses = [c.response.status for c in calls if c.response is not None]
    assert statuses == [200] * 255 + [500]
    assert body(calls[-1])["record"] == 1


def test_max_delay_waits_for_the_batch_to_fill_on_the_stages_clock(
    loop: asyncio.AbstractEventLoop,
) -> None:
    now = [0.0]
    stage = Manual(lambda rows: rows)
    runner = StageRunner(
        Stage("s", stage.fn),
        stage,
        StageStats(),
        loop,
        max_batch=3,
        max_delay=0.5,
        clock=lambda: now[0],
    )
    pipeline = PipelineRunner("p", {"s": runner})
    plan = Graph(Pipeline([Stage("s", stage.fn)])).plan()
    first = pipeline.submit(plan, ["a"], 1, answer)
    turn(loop)
    assert stage.batches == [] and runner._timer is not None  # waiting up to 0.5 s to fill
    now[0] = 0.2
    second = pipeline.submit(plan, ["b"], 1, answer)
    turn(loop)
    assert stage.batches == []
    now[0] = 0.5  # the oldest has waited max_delay: the batch goes as it is
    runner._dispatch()
    assert stage.batches == [["a", "b"]]
    stage.finish()
    assert body(first) == ["a"] and body(second) == ["b"]
    runner.stats.wait.compact()
    assert runner.stats.wait.total == pytest.approx(0.5 + 0.3)
    now[0] = 1.0
    full = [pipeline.submit(plan, [x], 1, answer) for x in "cde"]
    turn(loop)
    assert stage.batches[-1] == ["c", "d", "e"]  # full at max_batch: no wait
    stage.finish()
    assert [body(c) for c in full] == [["c"], ["d"], ["e"]]

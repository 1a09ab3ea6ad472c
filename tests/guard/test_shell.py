"""The guard as the first plugin, through the plugins' runner: requests of one loop turn scored
together (its request phase returns a Later that the batch settles), then their handlers run,
whatever those return; refusals answered by the guard; a client gone before its batch is scored
never reaches its handler."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from tests.guard.helpers import Guarded
from webtorch.config import GuardConfig
from webtorch.errors import BadRequest
from webtorch.guard.core import Guard
from webtorch.guard.features import RequestView
from webtorch.guard.scorer import Scorer
from webtorch.http.messages import HandlerResult, Pending, Request, Response, json_response


class CountingScorer(Scorer):
    """Injection 1.0 for a query that says "attack", else 0.0; counts how it was called."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lone = 0

    @staticmethod
    def _one(view: RequestView) -> tuple[float, float]:
        return (1.0 if "attack" in view.query else 0.0), 0.0

    def score_one(self, view: RequestView, client: list[float]) -> tuple[float, float]:
        self.lone += 1
        return self._one(view)

    def score(self, views: Sequence[RequestView], clients: Sequence[Sequence[float]]) -> np.ndarray:
        self.batches.append(len(views))
        return np.asarray([self._one(v) for v in views], dtype=np.float32)


def request(query: str = "", client: str = "10.0.0.1") -> Request:
    return Request("GET", "/x", query, [(b"host", b"h")], b"", client=client)


def resolve(result: HandlerResult) -> Response | None:
    if isinstance(result, Response):
        return result
    assert isinstance(result, Pending)
    return result.response


def shell(handler: object) -> tuple[Guarded, CountingScorer]:
    scorer = CountingScorer()
    guard = Guard(GuardConfig(mode="enforce", block=0.5), scorer)
    return Guarded(guard, handler, clock=lambda: 100.0), scorer  # type: ignore[arg-type]


def test_one_turns_requests_are_scored_together_and_refusals_answered() -> None:
    seen: list[str] = []

    def handler(req: Request) -> Response:
        seen.append(req.query)
        return json_response({"ok": req.query})

    async def main() -> None:
        guarded, scorer = shell(handler)
        results = [guarded(request(q, f"10.0.0.{i}")) for i, q in enumerate(["a", "attack", "b"])]
        assert all(isinstance(r, Pending) and r.response is None for r in results)
        assert seen == []  # nothing runs before the batch is scored
        await asyncio.sleep(0)
        assert scorer.batches == [3] and scorer.lone == 0
        answers = [resolve(r) for r in results]
        assert [a.status for a in answers if a is not None] == [200, 403, 200]
        assert seen == ["a", "b"]
        # A request alone in its turn takes the per-request path.
        lone = guarded(request("c"))
        await asyncio.sleep(0)
        assert scorer.lone == 1 and resolve(lone) is not None

    asyncio.run(main())


def test_what_a_handler_returns_reaches_the_client() -> None:
    later = Pending()

    async def coroutine() -> Response:
        return json_response({"from": "coroutine"})

    def handler(req: Request) -> HandlerResult:
        if req.query == "pending":
            return later
        if req.query == "coroutine":
            return coroutine()
        if req.query == "bad":
            raise BadRequest("no such thing")
        if req.query == "bug":
            raise RuntimeError("a bug")
        return json_response({})

    async def main() -> None:
        guarded, _ = shell(handler)
        queries = ["pending", "coroutine", "bad", "bug"]
        results = [guarded(request(q, f"10.0.1.{i}")) for i, q in enumerate(queries)]
        await asyncio.sleep(0)
        pending, from_coroutine, bad, bug = results
        assert resolve(pending) is None
        later.resolve(json_response({"from": "pending"}, status=201))
        assert (resolve(pending) or Response(0)).status == 201
        assert (resolve(bad) or Response(0)).status == 400
        assert (resolve(bug) or Response(0)).status == 500
        await asyncio.sleep(0)  # the coroutine's task
        await asyncio.sleep(0)
        assert (resolve(from_coroutine) or Response(0)).body == b'{"from":"coroutine"}'

    asyncio.run(main())


def test_a_client_gone_before_scoring_never_reaches_its_handler() -> None:
    seen: list[str] = []

    def handler(req: Request) -> Response:
        seen.append(req.query)
        return json_response({})

    async def main() -> None:
        guarded, scorer = shell(handler)
        first, second = guarded(request("a")), guarded(request("b", "10.0.0.2"))
        assert isinstance(first, Pending)
        first.cancel()  # what the protocol does when the connection closes
        await asyncio.sleep(0)
        assert scorer.batches == [2]  # still scored and counted
        assert seen == ["b"] and resolve(second) is not None

    asyncio.run(main())

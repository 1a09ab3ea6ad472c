"""A request phase that decides later without a task (plugins.api.Later), as the guard does:
decided from a callback (here: one batch per loop turn), the next plugins' request phases and
the route run only after go_on; respond answers instead; a client gone before the decision
cancels it (the route never runs); behind an async plugin the Later is awaited. And the
server's own plugins (the guard) run first whatever a configured plugin's order, under a name
no configured plugin may take."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.helpers import config, request, serving, write_plugins
from webtorch.config.plugins import PluginConfig
from webtorch.errors import ConfigError
from webtorch.http.messages import HandlerResult, Pending, Request, Response, json_response
from webtorch.plugins.host import PluginHost
from webtorch.plugins.later import Later
from webtorch.plugins.loader import from_object
from webtorch.plugins.runner import Runner
from webtorch.plugins.table import PluginSet


class Batcher:
    """Decides the requests of one loop turn together: "deny" in the query is answered 403."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.cancelled = 0
        self._waiting: list[tuple[Request, Later]] = []

    def request(self, ctx: Any) -> Later:
        later = Later()
        later.on_cancel = self._cancelled
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._flush)
        self._waiting.append((ctx.request, later))
        return later

    def _cancelled(self) -> None:
        self.cancelled += 1

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        self.batches.append(len(waiting))
        for asked, later in waiting:
            if "deny" in asked.query:
                later.respond(json_response({"denied": asked.query}, 403))
            else:
                later.go_on()


class Seen:
    """A plain request phase after the batcher: it must see only the requests let on."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def request(self, ctx: Any) -> None:
        self.seen.append(ctx.request.query)


class Waits:
    """An async request phase: the request becomes a task, which awaits a Later met after it."""

    async def request(self, ctx: Any) -> None:
        await asyncio.sleep(0)


def runner(*objs: object) -> Runner:
    loaded = [
        from_object(PluginConfig(path=Path(f"{i}.py"), name=f"p{i}"), Path(f"{i}.py"), obj)
        for i, obj in enumerate(objs)
    ]
    return Runner(PluginSet(loaded), _no_models)


def _no_models(name: str) -> Any:
    raise LookupError(name)


def get(query: str) -> Request:
    return Request("GET", "/x", query, [(b"host", b"h")], b"", client="10.0.0.1")


async def answered(result: HandlerResult) -> Response:
    if isinstance(result, Response):
        return result
    assert isinstance(result, Pending)
    for _ in range(20):  # a few loop turns: the batch, then any task
        if result.response is not None:
            return result.response
        await asyncio.sleep(0)
    raise AssertionError("never answered")


def test_a_later_settled_per_loop_turn_gates_the_next_plugins_and_the_route() -> None:
    batcher, seen, routed = Batcher(), Seen(), []

    def route(req: Request) -> Response:
        routed.append(req.query)
        return json_response({"ok": req.query})

    async def main() -> None:
        handler = runner(batcher, seen).wrap(route)
        results = [handler(get(q)) for q in ("a", "deny1", "b")]
        assert all(isinstance(r, Pending) and r.response is None for r in results)
        assert seen.seen == [] and routed == []  # nothing after the batcher before its turn
        statuses = [(await answered(r)).status for r in results]
        assert statuses == [200, 403, 200]
        assert batcher.batches == [3]
        assert seen.seen == ["a", "b"] and routed == ["a", "b"]

    asyncio.run(main())


def test_a_client_gone_before_the_decision_cancels_it_and_the_route_never_runs() -> None:
    batcher, routed = Batcher(), []

    def route(req: Request) -> Response:
        routed.append(req.query)
        return json_response({})

    async def main() -> None:
        handler = runner(batcher).wrap(route)
        gone, stays = handler(get("a")), handler(get("b"))
        assert isinstance(gone, Pending)
        gone.cancel()  # what the protocol does when the connection closes
        assert batcher.cancelled == 1
        assert (await answered(stays)).status == 200
        assert routed == ["b"] and gone.response is None

    asyncio.run(main())


def test_the_route_answers_later_through_a_pending_or_a_coroutine() -> None:
    inner = Pending()

    async def coroutine() -> Response:
        return json_response({"from": "coroutine"}, 201)

    def route(req: Request) -> HandlerResult:
        return inner if req.query == "pending" else coroutine()

    async def main() -> None:
        handler = runner(Batcher()).wrap(route)
        pending, later = handler(get("pending")), handler(get("coroutine"))
        assert (await answered(later)).status == 201
        assert isinstance(pending, Pending) and pending.response is None
        inner.resolve(json_response({}, 202))
        assert (await answered(pending)).status == 202

    asyncio.run(main())


def test_behind_an_async_plugin_the_later_is_awaited() -> None:
    batcher, seen = Batcher(), Seen()

    async def main() -> None:
        handler = runner(Waits(), batcher, seen).wrap(lambda req: json_response({}))
        results = [handler(get(q)) for q in ("a", "deny")]
        assert [(await answered(r)).status for r in results] == [200, 403]
        assert seen.seen == ["a"]

    asyncio.run(main())


def test_the_servers_own_plugins_run_first_and_keep_their_name(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"early": "class P:\n    def request(self, ctx): pass\nplugin = P()\n"})
    path = config(tmp_path, [{"path": "early.py", "order": -1000}])
    host = PluginHost([PluginConfig(path=Path("early.py"), order=-1000)], tmp_path, _no_models)
    host.put_first("guard", Seen())
    assert [p.name for p in host.plugins.plugins] == ["guard", "early"]
    with pytest.raises(ConfigError, match="'guard' is the server's own"):
        host.reload([PluginConfig(path=Path("early.py"), name="guard")], tmp_path)
    assert [p.name for p in host.plugins.plugins] == ["guard", "early"]  # the set it had
    assert path.exists()


BATCHER_FILE = """
import asyncio

from webtorch.plugins import Later, Response


class Batcher:
    def __init__(self):
        self.waiting = []

    def request(self, ctx):
        later = Later()
        if not self.waiting:
            asyncio.get_running_loop().call_soon(self.flush)
        self.waiting.append((ctx.query, later))
        return later

    def flush(self):
        waiting, self.waiting = self.waiting, []
        for query, later in waiting:
            if "deny" in query:
                later.respond(Response(403, b"denied"))
            else:
                later.go_on()


plugin = Batcher()
"""


def test_a_plugin_file_decides_later_on_a_real_server(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"batcher": BATCHER_FILE})
    with serving(config(tmp_path, [{"path": "batcher.py"}])) as running:
        queries = [f"/fixed?{'deny' if i % 3 == 0 else 'ok'}={i}" for i in range(30)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda q: request(running, "GET", q), queries))
    for query, (status, _, body) in zip(queries, answers, strict=True):
        assert (status, body) == ((403, b"denied") if "deny" in query else (200, b"fixed"))

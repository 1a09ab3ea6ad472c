"""The plugins' shell on the request path: the server's handler wrapped (request,
request_body, response, response_body), the access log's hook (log), the connection gate
(connect) and the proxy's picker (pick). Each reads the running set per request, so a reload
swaps plugins without touching a connection; each hook is counted and timed, and a failing one
is isolated (logged with its plugin's name; ``on_error`` decides: go on, or a 500 naming it).

A request whose phases are plain functions runs inside the server's callback; one that returns
a :class:`Later` resumes from the Later's callback (:class:`_Resume`: the guard's per-turn
batches); one with an ``async`` phase runs as a task. The server's own plugins (the guard) are
the set's first, so this is the one wrapper around the handler.

Without plugins and without the guard none of this is installed: the server's handler, gate and
access log hook are what they were (app.py installs these only for a non-empty set).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final

from webtorch.http.messages import (
    Handler,
    HandlerResult,
    Pending,
    Request,
    RequestBody,
    Response,
    error_response,
)
from webtorch.http.state import AccessLogger, ConnectionGate
from webtorch.plugins.bodies import FilteredBody, StreamWatch, collect
from webtorch.plugins.calls import (
    OPEN,
    Refused,
    bad_result,
    call_handler,
    failed,
    read_chunk,
    run_hook,
    run_quiet,
    run_waiting,
    settle,
)
from webtorch.plugins.context import Context, ModelSource
from webtorch.plugins.later import Later
from webtorch.plugins.table import Chain, Hook, Plugin, PluginSet
from webtorch.vocab import Upstream

log: Final = logging.getLogger("webtorch.plugins")


class Runner:
    """The running set's hooks on the request path (``set`` is swapped by a reload)."""

    def __init__(self, plugins: PluginSet, models: ModelSource) -> None:
        self.set = plugins
        self.models = models
        self._tasks: set[asyncio.Future[Any]] = set()

    # -- request, request_body, the handler, response, response_body -------------------------

    def wrap(self, handler: Handler) -> Handler:
        """The server's handler: every request through the plugins, then ``handler``."""

        def plugged(request: Request) -> HandlerResult:
            return self.around(request, handler)

        return plugged

    def streamed(self, handler: Handler, request: Request) -> HandlerResult:
        """A proxied route's handler, which the server calls itself for requests with a body
        (it streams); without one the request came through :meth:`wrap`'s handler already."""
        if request.stream is None:
            return handler(request)
        return self.around(request, handler)

    def around(self, request: Request, handler: Handler) -> HandlerResult:
        plugins = self.set
        chain = plugins.chain(request.path) if plugins.routed else plugins.everywhere
        if not chain.plugins:  # none of the plugins sees this path
            return handler(request)
        ctx = Context(request, chain, self.models)
        request.context = ctx
        stream = request.stream
        if stream is not None and chain.body_stream:
            # Its chunks go to the stream-mode plugins as they arrive; one may still answer.
            watch = StreamWatch(self.answer, ctx, stream)
            return watch.run(self._through(ctx, chain, handler, stream))
        return self._through(ctx, chain, handler, stream)

    def _through(
        self, ctx: Context, chain: Chain, handler: Handler, stream: RequestBody | None
    ) -> HandlerResult:
        if chain.waits or (stream is not None and chain.body_buffer):
            work = _Work()
            return self._later(self._waiting(ctx, chain, handler, work), work)
        if chain.before:
            try:
                answer = self._before(ctx, chain, 0)
            except Refused as refused:
                answer = refused.response
            if isinstance(answer, _Resume):
                return answer.start(handler)
            if answer is not None:
                return self.answer(ctx, chain, answer) if chain.answers else answer
        return self._handle(ctx, chain, handler)

    def _handle(self, ctx: Context, chain: Chain, handler: Handler) -> HandlerResult:
        """The route's handler, and the response phases over what it answers."""
        request = ctx.request
        result = call_handler(handler, request)
        if not chain.answers:
            return result
        if isinstance(result, Response):
            return self.answer(ctx, chain, result)
        if isinstance(result, Pending):
            outer = Pending()
            outer.on_cancel = result.cancel
            result.subscribe(self._answered, (ctx, outer))
            return outer
        return self._later(self._answer_later(ctx, chain, result), _Work())

    def _later(self, coroutine: Coroutine[Any, Any, Response], work: _Work) -> Pending:
        """A coroutine's response as a Pending (not the coroutine itself): what wraps this
        handler sees what a proxied route returns, as the guard's body scan must to keep
        watching a streamed body. Cancelling it (the client went away, or the guard refused
        the body mid-upload) cancels the route's own Pending at once, as a direct cancel
        would: a proxied upload stops before another chunk reaches the upstream."""
        pending = Pending()
        task = asyncio.ensure_future(coroutine)
        work.task = task
        self._tasks.add(task)
        pending.on_cancel = work.cancel
        task.add_done_callback(functools.partial(self._done, pending))
        return pending

    def _done(self, pending: Pending, task: asyncio.Future[Response]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            pending.resolve(task.result())
        else:  # a bug of ours: settle() and the phases catch what the route and plugins raise
            log.error("plugins failed", exc_info=exc)
            pending.resolve(error_response(500, "internal server error"))

    def _before(self, ctx: Context, chain: Chain, start: int) -> Response | _Resume | None:
        """The request and request_body phases (all plain functions here), from the
        ``start``-th request hook on; a :class:`_Resume` when one returned a :class:`Later`."""
        hooks = chain.request
        for i in range(start, len(hooks)):
            plugin, fn = hooks[i]
            result = run_hook(plugin, "request", fn, ctx, ctx)
            if result is None or result is OPEN:
                continue
            if isinstance(result, Later):
                return _Resume(self, ctx, result, i + 1)
            answer = self._requested(plugin, ctx, result)
            if answer is not None:
                return answer
        return self._bodies(ctx, chain)

    def _requested(self, plugin: Plugin, ctx: Context, result: object) -> Response | None:
        if result is None or result is OPEN:
            return None
        if isinstance(result, Response):
            return result
        bad_result(plugin, "request", ctx, result)
        return None

    def _bodies(self, ctx: Context, chain: Chain) -> Response | None:
        """request_body for a body already whole (buffered routes; streamed ones buffered for
        the plugins that asked); a streamed body's chunks go to ``stream`` plugins as they come."""
        request = ctx.request
        if request.stream is not None:
            return None  # buffer plugins: read whole first (_waiting); stream: StreamWatch
        if not request.body:
            return None  # no body (GET): no request_body phase
        for plugin, fn in chain.body_buffer:
            result = run_hook(plugin, "request_body", fn, ctx, ctx, request.body)
            answer = self._bodied(plugin, ctx, result)
            if answer is not None:
                return answer
        for plugin, fn in chain.body_stream:
            answer = read_chunk(plugin, fn, ctx, request.body, True)
            if answer is not None:
                return answer
        return None

    def _bodied(self, plugin: Plugin, ctx: Context, result: object) -> Response | None:
        if result is None or result is OPEN:
            return None
        if isinstance(result, Response):
            return result
        if isinstance(result, bytes | bytearray | memoryview):
            ctx.request.body = bytes(result)  # the route (or the upstream) gets this body
            return None
        bad_result(plugin, "request_body", ctx, result)
        return None

    async def _waiting(self, ctx: Context, chain: Chain, handler: Handler, work: _Work) -> Response:
        """The request as a task: some phase before the handler waits (an async hook, or a
        streamed body that a plugin wants whole)."""
        request = ctx.request
        try:
            answer = await self._before_waiting(ctx, chain)
        except Refused as refused:
            answer = refused.response
        if answer is None:
            result = call_handler(handler, request)
            if isinstance(result, Pending):
                work.inner = result
            answer = await settle(result)
        return self.answer(ctx, chain, answer) if chain.answers else answer

    async def _before_waiting(self, ctx: Context, chain: Chain) -> Response | None:
        for plugin, fn in chain.request:
            result = await run_waiting(plugin, "request", fn, ctx)
            if isinstance(result, Later):
                result = await _settled(result)
            answer = self._requested(plugin, ctx, result)
            if answer is not None:
                return answer
        request = ctx.request
        stream = request.stream
        if stream is not None and chain.body_buffer:
            # (stream-mode plugins see its chunks as they come: StreamWatch)
            body = await collect(stream, chain.body_limit)
            if body is None:
                return error_response(
                    413,
                    f"request body is larger than {chain.body_limit} bytes (plugin "
                    f"{chain.body_limiter!r} reads it whole: body_limit)",
                )
            request.body = body
            request.stream = None  # whole now: the route takes it as a buffered body
        elif stream is not None:
            return None  # streamed on to the route; stream-mode plugins read it (StreamWatch)
        elif not request.body:
            return None  # no body (GET): no request_body phase
        for plugin, fn in chain.body_buffer:
            result = await run_waiting(plugin, "request_body", fn, ctx)
            answer = self._bodied(plugin, ctx, result)
            if answer is not None:
                return answer
        if stream is None:  # (a streamed body's chunks went to them as they came)
            for plugin, fn in chain.body_stream:
                answer = read_chunk(plugin, fn, ctx, request.body, True)
                if answer is not None:
                    return answer
        return None

    def _answered(self, arg: tuple[Context, Pending], response: Response) -> None:
        ctx, outer = arg
        outer.resolve(self.answer(ctx, ctx.chain, response))

    async def _answer_later(
        self, ctx: Context, chain: Chain, result: Awaitable[Response]
    ) -> Response:
        return self.answer(ctx, chain, await settle(result))

    def answer(self, ctx: Context, chain: Chain, response: Response) -> Response:
        """The response and response_body phases over the route's (or a plugin's) answer."""
        # A copy: a route may answer every request with one Response object (fixed routes,
        # the guard's refusals), which a plugin's edits must not change for the next request.
        response = Response(
            response.status,
            response.body,
            response.content_type,
            list(response.headers),
            response.stream,
            response.content_length,
        )
        ctx.response = response
        for plugin, fn in chain.response:
            try:
                result = run_hook(plugin, "response", fn, ctx, ctx, response)
            except Refused as refused:
                result = refused.response
            if isinstance(result, Response):
                response = ctx.response = result
            elif result is not None and result is not OPEN:
                try:
                    bad_result(plugin, "response", ctx, result)
                except Refused as refused:
                    response = ctx.response = refused.response
        if chain.response_body:
            response = self._filter(ctx, chain.response_body, response)
        ctx.response = response
        return response

    def _filter(self, ctx: Context, hooks: Sequence[Hook], response: Response) -> Response:
        stream = response.stream
        if stream is not None:
            # Its length may change: chunked (or for HTTP/1.0, closed) instead.
            response.stream = FilteredBody(stream, ctx, hooks)
            response.content_length = None
            response.headers = [(k, v) for k, v in response.headers if k != b"content-length"]
            return response
        body = response.body
        for plugin, fn in hooks:
            try:
                out = run_hook(plugin, "response_body", fn, ctx, ctx, body, True)
            except Refused as refused:
                return refused.response
            if isinstance(out, bytes | bytearray | memoryview):
                body = bytes(out)
            elif out is not None and out is not OPEN:
                try:
                    bad_result(plugin, "response_body", ctx, out)
                except Refused as refused:
                    return refused.response
        if body is not response.body:
            response.body = body
            if ctx.request.method != "HEAD":
                response.content_length = None
        return response

    # -- log -----------------------------------------------------------------------------------

    def log_hook(self, inner: AccessLogger | None) -> AccessLogger:
        """The server's access log hook: the access log's line, then the log phase. The server
        calls it once per request it took, after its last byte went out, when the client went
        away (499), or when the request was refused while it was read."""

        def logged(request: Request, status: int, sent: int, seconds: float) -> None:
            if inner is not None:
                inner(request, status, sent, seconds)
            self.logged(request, status, sent, seconds)

        return logged

    def logged(self, request: Request, status: int, sent: int, seconds: float) -> None:
        ctx = request.context
        if not isinstance(ctx, Context):  # no plugin saw it (refused while read, the guard's)
            plugins = self.set
            if not plugins.everywhere.log:
                return
            chain = plugins.chain(request.path) if plugins.routed else plugins.everywhere
            if not chain.log:
                return
            ctx = Context(request, chain, self.models)
            request.context = ctx
        ctx.status = status
        ctx.sent = sent
        ctx.seconds = seconds
        for plugin, fn in ctx.chain.log:
            run_quiet(plugin, "log", fn, ctx, ctx)  # the response is out: closed or open alike
        request.context = None  # the context's cycle (ctx.request) ends with the request

    # -- connect --------------------------------------------------------------------------------

    def gate(self, inner: ConnectionGate | None) -> ConnectionGate:
        return PluginGate(self, inner)

    # -- pick -----------------------------------------------------------------------------------

    def pick(
        self,
        request: Request,
        candidates: Sequence[Upstream],
        policy: Callable[[Sequence[Upstream]], Upstream],
    ) -> tuple[Sequence[Upstream], Upstream | None]:
        """The pick phase (proxy/forward.py asks it per attempt): the candidates the plugins
        left, and the one a plugin chose, if one did (else the group's policy chooses).
        ``ctx.policy(candidates)`` asks the group's policy meanwhile (to wrap it)."""
        ctx = request.context
        if not isinstance(ctx, Context):
            return candidates, None
        asked = _Asked(policy)
        ctx.policy = asked
        try:
            return self._pick(ctx, request, candidates, asked)
        finally:
            ctx.policy = None

    def _pick(
        self, ctx: Context, request: Request, candidates: Sequence[Upstream], asked: _Asked
    ) -> tuple[Sequence[Upstream], Upstream | None]:
        for plugin, fn in ctx.chain.pick:
            try:
                result = run_hook(plugin, "pick", fn, ctx, ctx, list(candidates))
            except Refused:
                return [], None  # failed closed: no upstream (503)
            if result is None or result is OPEN:
                continue
            if isinstance(result, Upstream):
                if result in candidates:
                    if result is not asked.last:  # else the policy's reason stands
                        request.reason = f"plugin:{plugin.name}"
                    return candidates, result
                what = "an upstream that is not a candidate"
            elif isinstance(result, list | tuple):
                if all(u in candidates for u in result):
                    candidates = list(result)
                    if not candidates:
                        return [], None  # vetoed every one
                    continue
                what = "upstreams that are not candidates"
            else:
                what = f"a {type(result).__name__}"
            if not _bad_pick(plugin, ctx, what):
                return [], None  # failed closed: no upstream (503)
        return candidates, None


class _Resume:
    """A request whose ``request`` phase returned a :class:`Later`: the phases after it, the
    route and the response phases run from the Later's callback, and the server waits on
    ``outer`` meanwhile (no task). The client going away cancels whatever it waits on."""

    __slots__ = ("ctx", "handler", "inner", "later", "next", "outer", "runner")

    def __init__(self, runner: Runner, ctx: Context, later: Later, after: int) -> None:
        self.runner = runner
        self.ctx = ctx
        self.later = later
        self.next = after  # the request hook to go on from
        self.outer = Pending()
        self.inner: Pending | None = None  # the route's, once it runs
        self.handler: Handler | None = None

    def start(self, handler: Handler) -> Pending:
        self.handler = handler
        self.outer.on_cancel = self.cancel
        self.later.subscribe(_resumed, self)
        return self.outer

    def cancel(self) -> None:
        self.later.cancel()
        if self.inner is not None:
            self.inner.cancel()

    def resumed(self, answer: Response | None) -> None:
        runner, ctx, outer = self.runner, self.ctx, self.outer
        chain = ctx.chain
        if answer is None:
            try:
                found = runner._before(ctx, chain, self.next)
            except Refused as refused:
                found = refused.response
            if isinstance(found, _Resume):  # another plugin's Later: wait for it in turn
                self.later, self.next = found.later, found.next
                self.later.subscribe(_resumed, self)
                return
            answer = found
        if answer is not None:
            outer.resolve(runner.answer(ctx, chain, answer) if chain.answers else answer)
            return
        assert self.handler is not None
        result = runner._handle(ctx, chain, self.handler)
        if isinstance(result, Response):
            outer.resolve(result)
            return
        if not isinstance(result, Pending):  # a coroutine (not proxied): its task
            result = runner._later(settle(result), _Work())
        self.inner = result
        result.subscribe(_pass_on, outer)


def _resumed(resume: _Resume, answer: Response | None) -> None:
    resume.resumed(answer)


def _pass_on(outer: Pending, response: Response) -> None:
    outer.resolve(response)


async def _settled(later: Later) -> Response | None:
    """A Later met on the async path (another plugin made the request a task): awaited."""
    done: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()
    later.subscribe(_set, done)
    try:
        return await done
    except asyncio.CancelledError:
        later.cancel()
        raise


def _set(done: asyncio.Future[Response | None], answer: Response | None) -> None:
    if not done.done():
        done.set_result(answer)


class _Asked:
    """The group's policy as a pick phase asks it: what it answered last."""

    __slots__ = ("last", "policy")

    def __init__(self, policy: Callable[[Sequence[Upstream]], Upstream]) -> None:
        self.policy = policy
        self.last: Upstream | None = None

    def __call__(self, candidates: Sequence[Upstream]) -> Upstream:
        if not candidates:
            raise ValueError("ctx.policy(): no candidates to choose from")
        self.last = self.policy(candidates)
        return self.last


def _bad_pick(plugin: Plugin, ctx: Context, what: str) -> bool:
    """Count a pick that returned what it may not; whether the request goes on (open)."""
    try:
        failed(plugin, "pick", ctx, None, f"returned {what}")
    except Refused:
        return False
    return True


class PluginGate:
    """The server's connection gate: the inner one (the guard's) first, then each plugin's
    ``connect(address)``; False refuses. ``disconnect(address)`` when an admitted one ends
    (each plugin that joins it hears of every connection admitted, as nginx's limit_conn)."""

    def __init__(self, runner: Runner, inner: ConnectionGate | None) -> None:
        self.runner = runner
        self.inner = inner

    def admit(self, address: str) -> bool:
        inner = self.inner
        if inner is not None and not inner.admit(address):
            return False
        plugins = self.runner.set
        for plugin, fn in plugins.connect:
            try:
                result = run_hook(plugin, "connect", fn, None, address)
            except Refused:
                result = False
            if result is False:
                if inner is not None:
                    inner.release(address)  # it admitted the connection that closes now
                # Those before it admitted it too: they hear that it ends.
                for earlier, bye in plugins.disconnect:
                    if earlier.index < plugin.index:
                        run_quiet(earlier, "disconnect", bye, None, address)
                return False
        return True

    def release(self, address: str) -> None:
        if self.inner is not None:
            self.inner.release(address)
        for plugin, fn in self.runner.set.disconnect:
            run_quiet(plugin, "disconnect", fn, None, address)


class _Work:
    """A request's task and the route's Pending inside it, cancelled together."""

    __slots__ = ("inner", "task")

    def __init__(self) -> None:
        self.task: asyncio.Future[Response] | None = None
        self.inner: Pending | None = None

    def cancel(self) -> None:
        if self.inner is not None:
            self.inner.cancel()  # now, not at the task's next step
        if self.task is not None:
            self.task.cancel()

"""Bodies through plugins: a streamed response body filtered chunk by chunk
(:class:`FilteredBody`, response_body), a streamed request body read by stream-mode
request_body plugins that may still stop it (:class:`StreamWatch`), and one read whole for the
buffer-mode ones (:func:`collect`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from webtorch.http.messages import (
    BodySink,
    BodySource,
    HandlerResult,
    Pending,
    RequestBody,
    Response,
)
from webtorch.http.watch import RouteWatch
from webtorch.plugins.calls import Refused, read_chunk, run_hook
from webtorch.plugins.context import Context
from webtorch.plugins.table import Chain, Hook

# The response phases over an answer (Runner.answer).
Answer = Callable[[Context, Chain, Response], Response]


class FilteredBody:
    """A streamed response body through the response_body phase: each chunk as it comes, and
    the end (an empty chunk, ``end`` True) so a plugin that buffers can write what it kept."""

    __slots__ = ("ctx", "failed", "hooks", "sink", "source")

    def __init__(self, source: BodySource, ctx: Context, hooks: Sequence[Hook]) -> None:
        self.source = source
        self.ctx = ctx
        self.hooks = hooks
        self.sink: BodySink | None = None
        self.failed = False

    # BodySource, towards the connection
    def start(self, sink: BodySink) -> None:
        self.sink = sink
        self.source.start(self)

    def pause(self) -> None:
        self.source.pause()

    def resume(self) -> None:
        self.source.resume()

    def cancel(self) -> None:
        self.source.cancel()

    # BodySink, towards the source
    def write(self, data: bytes) -> None:
        out = self._through(data, False)
        if out and self.sink is not None:
            self.sink.write(out)

    def end(self) -> None:
        out = self._through(b"", True)
        if self.sink is not None and not self.failed:
            if out:
                self.sink.write(out)
            self.sink.end()

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()

    def _through(self, data: bytes, end: bool) -> bytes:
        if self.failed:
            return b""
        for plugin, fn in self.hooks:
            try:
                out = run_hook(plugin, "response_body", fn, self.ctx, self.ctx, data, end)
            except Refused:
                # The head is out: a 500 cannot be sent any more; the client sees a truncation.
                self.failed = True
                self.source.cancel()
                if self.sink is not None:
                    self.sink.abort()
                return b""
            if isinstance(out, bytes | bytearray | memoryview):
                data = bytes(out)
        return data


class StreamWatch(RouteWatch):
    """A streamed request body read by the stream-mode request_body plugins as it arrives,
    each chunk before it goes anywhere (RequestBody.inspect, after the guard's scan). One that
    answers stops the request: the route's work is cancelled (a proxied upload is abandoned
    mid-body, before that chunk reaches the upstream) and the answer goes out; if the
    response had begun, it is cut short (the client sees a truncation): http/watch.py's
    RouteWatch, which the guard's BodyWatch is too."""

    __slots__ = ("answer", "before", "ctx")

    def __init__(self, answer: Answer, ctx: Context, stream: RequestBody) -> None:
        super().__init__(stream)
        self.answer = answer  # the response phases over an answer (Runner.answer)
        self.ctx = ctx
        self.before = stream.inspect  # what inspected it already (the guard's scan)
        stream.inspect = self.feed

    def run(self, result: HandlerResult) -> HandlerResult:
        """The route's ``result``, watched: a Pending that an answer from a plugin can still
        beat. (The runner turns coroutines into Pendings: only a Response is not one.)"""
        if not isinstance(result, Pending):
            return result  # answered already: the chunks are only read from here on
        return self.watch(result)

    def feed(self, data: bytes) -> None:
        before = self.before
        if before is not None:
            before(data)
            if self.stream.inspect != self.feed:  # equal, not identical: a new bound method
                return  # the guard refused it while reading this chunk
        end = data == b""
        ctx = self.ctx
        for plugin, fn in ctx.chain.body_stream:
            answer = read_chunk(plugin, fn, ctx, data, end)
            if answer is not None:
                self.refuse(answer)
                return
        if end:
            self.stream.inspect = None  # read whole: the response need not be relayed

    def refuse(self, answer: Response) -> None:
        ctx = self.ctx
        chain = ctx.chain
        self.stop(lambda: self.answer(ctx, chain, answer) if chain.answers else answer)


class _Collector:
    """A streamed body read whole, up to a limit (None past it)."""

    def __init__(self, stream: RequestBody, limit: int, done: asyncio.Future[bytes | None]) -> None:
        self.stream = stream
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def on_body_data(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.stream.detach()  # the rest is dropped; the 413 closes nothing early
            if not self.done.done():
                self.done.set_result(None)
            return
        self.parts.append(data)

    def on_body_end(self) -> None:
        if not self.done.done():
            self.done.set_result(b"".join(self.parts))

    def on_body_abort(self) -> None:
        if not self.done.done():
            self.done.cancel()  # the client went away: so does this request


async def collect(stream: RequestBody, limit: int) -> bytes | None:
    done: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
    stream.attach(_Collector(stream, limit, done))
    try:
        return await done
    except asyncio.CancelledError:
        stream.detach()  # answered meanwhile (the guard refused it): the rest is dropped
        raise

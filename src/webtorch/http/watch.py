"""A streamed request body whose reader may still stop the route it streams to.

The guard's body scan (guard/body.py) and stream-mode ``request_body`` plugins
(plugins/bodies.py) both read a body's chunks as they arrive (``RequestBody.inspect``), before
each goes on, and both may decide mid-body that the request must not go on. What stopping means
is the same for both, and is this class: while no answer has begun, the route's work is
cancelled (a proxied upload is abandoned mid-body, before the chunk reaches the upstream) and the
reader's answer goes out instead; once the route's response has begun, its body's source is
cancelled and the client sees a truncation. To reach that source, the watch relays the
response's body while a chunk may still stop it.

Not compiled (compiled.py): it runs once per streamed body under a reader, not per request.
"""

from __future__ import annotations

from collections.abc import Callable

from webtorch.http.messages import BodySink, BodySource, Pending, RequestBody, Response


class RouteWatch:
    """The route's answer as its body's reader sees it: :meth:`watch` the route's Pending,
    :meth:`stop` to end it with the reader's answer (or cut a begun response short)."""

    __slots__ = ("inner", "outer", "sink", "source", "stream")

    def __init__(self, stream: RequestBody) -> None:
        self.stream = stream
        self.outer = Pending()  # what the server waits on: the route's answer or the reader's
        self.inner: Pending | None = None  # the route's own
        self.source: BodySource | None = None  # the route's response body, while relayed
        self.sink: BodySink | None = None

    def watch(self, result: Pending) -> Pending:
        """Stand between the route's ``result`` and the server: a Pending the reader can still
        answer first."""
        self.inner = result
        self.outer.on_cancel = result.cancel
        result.subscribe(_relay, self)
        return self.outer

    def answered(self, response: Response) -> None:
        """The route answered: pass it on, relaying its body while the reader may still stop it."""
        if response.stream is not None and self.stream.inspect is not None:
            self.source = response.stream
            response.stream = self
        self.outer.resolve(response)

    def stop(self, answer: Callable[[], Response]) -> None:
        """End the route: ``answer()`` goes out if no response has begun, else the begun one is
        cut short. The body is read no further."""
        self.stream.inspect = None
        if self.outer.response is None:
            if self.inner is not None:
                self.inner.cancel()  # the route's work stops now, before this chunk goes on
            self.outer.resolve(answer())
            return
        source, sink = self.source, self.sink
        if source is not None:
            source.cancel()
        if sink is not None:
            sink.abort()

    # -- the response body's source, relayed ---------------------------------------------

    def start(self, sink: BodySink) -> None:
        self.sink = sink
        assert self.source is not None
        self.source.start(sink)

    def pause(self) -> None:
        assert self.source is not None
        self.source.pause()

    def resume(self) -> None:
        assert self.source is not None
        self.source.resume()

    def cancel(self) -> None:
        self.stream.inspect = None
        assert self.source is not None
        self.source.cancel()


def _relay(watch: RouteWatch, response: Response) -> None:
    watch.answered(response)

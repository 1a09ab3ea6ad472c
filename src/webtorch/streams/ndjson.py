"""The HTTP form of a model stream: ``POST /v2/models/{name}/stream`` with a chunked NDJSON
body (one item per line, as the WebSocket's messages) answered by a chunked NDJSON response
(one answer per line, in order, as they come), for clients that cannot speak WebSocket.

The request is dispatched when its headers are in (a streamed route, as a proxied upload is),
so items are answered while the body still arrives. The same session as the WebSocket's
(streams/models.py) does the work; this is its channel: lines in from the request body, lines
out into the response body. Backpressure both ways: a full queue pauses reading the request
body, and a client that does not read the response pauses it too. The answer ends once the
body has ended and every item is answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from webtorch.errors import UnsupportedMediaType
from webtorch.http.messages import BodySink, Request, RequestBody, Response

if TYPE_CHECKING:
    from webtorch.streams.models import ModelStreams, Session

NDJSON = b"application/x-ndjson"


class NdjsonStream:
    """One HTTP stream: the request body's consumer, the response body's source, the session's
    channel."""

    def __init__(self, owner: ModelStreams, body: RequestBody, max_line: int) -> None:
        self.owner = owner
        self.body = body
        self.max_line = max_line
        self.session: Session | None = None
        self.sink: BodySink | None = None
        self.out: list[bytes] = []  # answers before the response body started
        self.partial = b""  # a line not yet whole
        self.held = False
        self.reading_paused = False  # by the client not reading the answers
        self.body_ended = False
        self.done = False

    # -- Channel (the session's side) ---------------------------------------------------------

    def send(self, data: str) -> None:
        line = data.encode() + b"\n"
        if self.sink is None:
            self.out.append(line)
        else:
            self.sink.write(line)

    def hold(self, held: bool) -> None:
        self.held = held
        self._update()

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._finish()

    # -- BodyConsumer (the request body) ------------------------------------------------------

    def on_body_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > self.max_line:
            self.send(orjson.dumps({"error": f"a line longer than {self.max_line} bytes"}).decode())
            self.partial = b""
            self.body.detach()
            self.body_ended = True
            self._idle()
            return
        for line in lines:
            if line.strip() and not self.done:
                session.message(self, line.decode("utf-8", "replace"))

    def on_body_end(self) -> None:
        if self.partial.strip() and self.session is not None:
            self.session.message(self, self.partial.decode("utf-8", "replace"))
        self.partial = b""
        self.body_ended = True
        self._idle()

    def on_body_abort(self) -> None:
        self._finish()

    # -- BodySource (the response body) -------------------------------------------------------

    def start(self, sink: BodySink) -> None:
        self.sink = sink
        for line in self.out:
            sink.write(line)
        self.out = []
        if self.done:
            sink.end()

    def pause(self) -> None:
        self.reading_paused = True
        self._update()

    def resume(self) -> None:
        self.reading_paused = False
        self._update()

    def cancel(self) -> None:
        self._finish()

    # -- inside -------------------------------------------------------------------------------

    def _update(self) -> None:
        if self.held or self.reading_paused:
            self.body.pause()
        else:
            self.body.resume()

    def _idle(self) -> None:
        """The answer ends once the body has and the session has nothing queued or in flight
        (called again by the session when it runs dry)."""
        session = self.session
        busy = session is not None and (session.in_flight is not None or session.queue)
        if self.body_ended and not busy:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        session = self.session
        if session is not None:
            session.on_idle = None
            session.closed(None, 1000)
        if self.sink is not None:
            self.sink.end()


def check_ndjson(request: Request) -> None:
    if request.content_type != NDJSON:
        raise UnsupportedMediaType(
            "the HTTP form of a stream takes `Content-Type: application/x-ndjson` (one JSON "
            "item per line)"
        )


def open_stream(owner: ModelStreams, request: Request, session: Session) -> Response:
    """The response of an HTTP stream whose session is attached."""
    assert request.stream is not None
    channel = NdjsonStream(owner, request.stream, owner.hub.settings.max_message)
    channel.session = session
    session.ws = channel
    session.on_idle = channel._idle
    channel.send(session.hello())
    session.flush_hello()  # before the body: items that came with the head are run then
    request.stream.attach(channel)
    return Response(200, b"", NDJSON, stream=channel)

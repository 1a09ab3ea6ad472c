"""Server-sent events for answers only: ``GET /v2/models/{name}/stream?stream=ID`` with
``Accept: text/event-stream`` follows the answers of stream ID (open on another connection, a
device's WebSocket) as they are sent: a dashboard or a page watching one device.

A watcher never slows the stream it watches: its events are written as they come, and one
whose client does not read them (its response paused) or that falls more than ``_BACKLOG``
events behind before its response starts is dropped (its response ends). At most
``MAX_WATCHERS`` per stream. The answer ends when the stream closes.
"""

from __future__ import annotations

from typing import Final

from webtorch.http.messages import BodySink

EVENT_STREAM: Final = b"text/event-stream"
MAX_WATCHERS: Final = 16
_BACKLOG: Final = 256


class Watcher:
    """One SSE response following a stream's answers: a BodySource."""

    def __init__(self) -> None:
        self.sink: BodySink | None = None
        self.backlog: list[bytes] = []
        self.ended = False

    def push(self, data: bytes) -> bool:
        """One answer as an event; False when this watcher is done (dropped or ended)."""
        if self.ended:
            return False
        event = b"data: %s\n\n" % data
        if self.sink is None:
            if len(self.backlog) >= _BACKLOG:
                self.end()
                return False
            self.backlog.append(event)
        else:
            self.sink.write(event)
        return True

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            if self.sink is not None:
                self.sink.end()

    # -- BodySource ---------------------------------------------------------------------------

    def start(self, sink: BodySink) -> None:
        self.sink = sink
        sink.write(b": following the stream's answers\n\n")
        for event in self.backlog:
            sink.write(event)
        self.backlog = []
        if self.ended:
            sink.end()

    def pause(self) -> None:
        self.end()  # a watcher that does not read is dropped, never buffered for

    def resume(self) -> None:
        pass

    def cancel(self) -> None:
        self.ended = True

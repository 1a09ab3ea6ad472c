"""HTTP/1.1 pipelining: each request takes a slot in arrival order when its head is in, its
handler runs (answering at once, through a :class:`Pending`, or as an awaitable), and responses
are written strictly in slot order, whatever order the handlers finish in. Also the per-request
bookkeeping that goes with an answer: the observer (metrics), byte counts and the access log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Final

from webtorch.errors import HTTPError
from webtorch.http.connection import BODY, HEADERS, IDLE, WAIT, Slot
from webtorch.http.flow import Flow
from webtorch.http.messages import (
    Handler,
    HandlerResult,
    Pending,
    Request,
    RequestBody,
    Response,
    error_response,
    response_for_error,
)
from webtorch.http.serialise import (
    CONTINUE,
    JOINED_BODY_MAX,
    NO_BODY_STATUSES,
    content_length,
    head_lines,
)
from webtorch.http.state import ServerState

log: Final = logging.getLogger("webtorch.http")

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter


class Delivery(Flow):
    """A connection's requests in flight and their answers (see http/connection.py)."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(state, loop)
        # Bound once: what a Pending calls with a response (a bound method made per request
        # would be an allocation per request).
        self._answer: Callable[[Slot, Response], None] = self._deliver
        # The server's head cache, bound once: a field read away, as the state is.
        self._heads = state.heads
        self.tasks: set[asyncio.Future[Response]] = set()
        self._stream: RequestBody | None = None  # the body of a request already dispatched

    def _start_stream(
        self, transport: asyncio.Transport, response: Response, slot: Slot, keep_alive: bool
    ) -> None:
        """Write a streamed response's head and start its body (the layer above: Streams)."""
        raise NotImplementedError

    def _dispatch(self, slot: Slot, request: Request, handler: Handler) -> None:
        try:
            result: HandlerResult = handler(request)
        except HTTPError as exc:
            result = response_for_error(exc)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            result = error_response(500, "internal server error")
        if isinstance(result, Response):
            self._deliver(slot, result)
        elif isinstance(result, Pending):
            slot.pending = result
            result.subscribe(self._answer, slot)
        else:
            try:
                fut = asyncio.ensure_future(result, loop=self.loop)
            except TypeError:
                log.error("handler for %s returned %r", request.path, type(result).__name__)
                self._deliver(slot, error_response(500, "internal server error"))
            else:
                self.tasks.add(fut)
                fut.add_done_callback(functools.partial(self._on_result, slot))

    def _on_result(self, slot: Slot, fut: asyncio.Future[Response]) -> None:
        self.tasks.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            response = fut.result()
        elif isinstance(exc, HTTPError):
            response = response_for_error(exc)
        else:
            log.error("handler failed", exc_info=exc)
            response = error_response(500, "internal server error")
        self._deliver(slot, response)

    def _deliver(self, slot: Slot, response: Response) -> None:
        """A handler's response is ready: record it, write it if its turn has come."""
        if self.transport is None or slot.response is not None:
            # The client went away, or the request was already answered (its body broke a
            # limit while streaming): this response goes nowhere.
            if response.stream is not None:
                response.stream.cancel()
            return
        slot.response = response
        observer = self.state.observer
        if observer is not None and slot.request is not None:
            try:
                observer(slot.request, response.status, _clock() - slot.started)
            except Exception:  # a metrics bug must not cost the client its response
                log.exception("request observer failed")
        state = self.state
        if response.stream is None and (
            state.access_log is not None or state.sent_observer is not None
        ):
            # A streamed body is counted and logged when it ends, with the bytes that went out.
            status = response.status
            empty = slot.head or status in NO_BODY_STATUSES
            sent = 0 if empty else len(response.body)
            if state.sent_observer is not None and slot.request is not None:
                state.sent_observer(slot.request, sent)
            self._log(slot, status, sent)
        slots = self.slots
        if (
            len(slots) == 1
            and slots[0] is slot
            and slot.keep_alive
            and self.phase == WAIT
            and response.stream is None
            and not (self.closing or self.state.draining or self.read_paused)
        ):
            # The common case, what _flush would do in it: the only request in flight is
            # answered and the connection goes idle. Spelled out because it runs per request.
            slots.popleft()
            self._write(self.transport, response, slot, True)
            self.phase = IDLE
            self.deadline = self._time() + self.limits.keepalive_timeout
        else:
            stream = self._stream
            if stream is not None and slot.request is not None and slot.request.stream is stream:
                stream.orphan()  # answered while its body arrives: unless taken, drop the rest
            if slots and slots[0] is slot:
                self._flush()

    def _flush(self) -> None:
        """Write every ready response at the head of the pipeline, in order."""
        if self._streaming is not None:
            return  # a body is still being streamed; the rest waits for its end
        slots = self.slots
        transport = self.transport
        while slots:
            slot = slots[0]
            response = slot.response
            if response is None:
                if slot.expect_continue:
                    self._send_continue(slot)
                break
            slots.popleft()
            if transport is None:
                return
            # Draining: requests already taken have run (perhaps a training step), so all of them
            # are answered; the last one, with no request left being received, says close.
            receiving = self.phase in (HEADERS, BODY)
            last = not slots and not receiving
            keep_alive = slot.keep_alive and not (self.state.draining and last)
            if response.stream is not None:
                self._start_stream(transport, response, slot, keep_alive)
                return
            self._write(transport, response, slot, keep_alive)
            if not keep_alive:
                self.closing = True
                slots.clear()
                self._linger(transport)
                return
        if not slots:
            if self.closing:
                if transport is not None and self.phase not in (HEADERS, BODY):
                    self._linger(transport)
            elif self.phase == WAIT:
                self.phase = IDLE
                self.deadline = self._time() + self.limits.keepalive_timeout
        if self.read_paused:
            self._update_reading()

    def _write(
        self, transport: asyncio.Transport, response: Response, slot: Slot, keep_alive: bool
    ) -> None:
        body = response.body
        status = response.status
        request = slot.request
        plain = (
            keep_alive
            and not response.headers
            and not slot.head
            and status not in NO_BODY_STATUSES
            and len(body) < JOINED_BODY_MAX
            and (request is None or request.http_version != "1.0")
        )
        if plain:  # the common case: one cached head, one write
            heads = self._heads
            ctype = response.content_type
            if status == heads.last_status and ctype is heads.last_type:
                head = heads.last_head  # most responses repeat the one before: no key to build
            else:
                head = heads.head(status, ctype)
            size = len(body)
            if request is not None and request.request_id:
                self._send(
                    b"%s%d\r\nx-request-id: %s\r\n\r\n%s" % (head, size, request.request_id, body)
                )
            else:
                # One allocation: mypyc compiles bytes %-formatting of bytes and ints into a
                # single build, with no format string parsed at run time.
                self._send(b"%s%d\r\n\r\n%s" % (head, size, body))
            return
        framing = b""
        if status not in NO_BODY_STATUSES:
            length = response.content_length
            framing = content_length(len(body) if length is None else length)
        parts = head_lines(self._heads, response, request, framing, keep_alive)
        if slot.head or status in NO_BODY_STATUSES:
            transport.write(b"".join(parts))
        elif len(body) < JOINED_BODY_MAX:
            parts.append(body)
            transport.write(b"".join(parts))
        else:
            transport.write(b"".join(parts))
            transport.write(body)

    def _send_continue(self, slot: Slot) -> None:
        slot.expect_continue = False
        if self.transport is not None:
            self.transport.write(CONTINUE)

    def _log(self, slot: Slot, status: int, sent: int) -> None:
        access_log = self.state.access_log
        request = slot.request
        if access_log is None or request is None:
            return
        try:
            access_log(request, status, sent, _clock() - slot.started)
        except Exception:  # a logging bug must not cost the client its response
            log.exception("access log failed")

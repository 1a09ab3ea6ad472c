"""The access log: one JSON line per request, written off the request path.

The event loop's share is one call per request, :meth:`AccessLog.record`: a sampling draw (when
sampling), a length check and a ``deque.append`` of a tuple of fields already at hand. Everything
else happens on a writer thread, which wakes every ``interval`` seconds (sooner when the queue is
half full, or to reopen the file), takes what is queued, encodes it with orjson and writes it in
one call. A slow disk therefore slows only the writer: once ``buffer`` lines wait, new ones are
dropped and counted (``webtorch_access_log_dropped_total``), and serving never waits.

Rotation as nginx does it: move the file away, then send SIGUSR1; the writer reopens the path
before its next write, so later lines land in a new file while the moved one is complete.

A line (keys always present, null when not applicable)::

    {"time": "2026-11-24T04:46:03.123Z", "request_id": "5f0c...", "client": "127.0.0.1",
     "method": "POST", "path": "/v2/models/resnet/infer", "query": null, "status": 200,
     "bytes": 133, "duration": 0.001234, "route": "/v2/", "model": null,
     "upstream": "10.0.0.2:9001", "reason": "hash", "retries": 0,
     "guard_score": null, "guard_action": null, "stages": null}

``time`` is when the response was complete (ISO 8601, UTC, milliseconds); ``duration`` is seconds
from the request's arrival (its whole body for a model or fixed route; its head for a proxied
one, whose body streams) to its response: ready to write, or for a streamed body its last byte
written. ``bytes`` counts response body bytes sent. ``status`` 499 means the client went away
before its response (as nginx). ``path`` is percent-decoded, ``query`` as received except the
values of credential-like parameters (``api_key``, ``access_token``, ``password``...), which are
``REDACTED``; no header is logged (Authorization, API key headers). A file is created 0640.
``stages``: for a pipeline's request, the milliseconds its rows spent in each stage (as its
``Server-Timing`` header), e.g. ``{"clean": 0.41, "featurize": 0.2}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson
from prometheus_client.core import CounterMetricFamily, Metric

from webtorch.files import make_private_dir
from webtorch.http.messages import Request

log = logging.getLogger("webtorch.access")

# What the event loop queues per line: time, request_id, client, method, path, query, status,
# bytes, duration, route, model, upstream, reason, retries, guard score and action, stages.
Record = tuple[
    float,
    bytes,
    str,
    str,
    str,
    str,
    int,
    int,
    float,
    str,
    str,
    str,
    str,
    int,
    float | None,
    str,
    str,
]
KEYS = (
    "time",
    "request_id",
    "client",
    "method",
    "path",
    "query",
    "status",
    "bytes",
    "duration",
    "route",
    "model",
    "upstream",
    "reason",
    "retries",
    "guard_score",
    "guard_action",
    "stages",
)
LOG_FILE = 0o640
LOG_DIR = 0o750
# Query parameters whose values are credentials by their name (api_key, access_token, password,
# X-Amz-Signature...): logged as "REDACTED". The log may be read more widely than the server's
# secrets should be, and a line is kept for long. A name is split into its words (at _ - . [ ]
# and lower-to-upper case changes), and one word must be a credential's: "keyword", "monkey" or
# "design" stay readable.
_SECRET_WORDS: Final = frozenset(
    {
        "token", "key", "apikey", "secret", "password", "passwd", "pwd", "pass", "auth",
        "authorization", "signature", "sig", "credential", "credentials", "session",
        "sessionid", "sid", "jwt", "otp", "code_verifier",
    }
)  # fmt: skip
_WORD_SPLIT = re.compile(r"[_\-.\[\]]+|(?<=[a-z0-9])(?=[A-Z])")
_ERROR_EVERY = 60.0  # seconds between two warnings about failed writes
_CHUNK = 256  # lines encoded between two writes (about half a millisecond of work)


def redact_query(query: str) -> str:
    """``query`` with the values of its credential-like parameters replaced by ``REDACTED``
    (the writer thread's work: the event loop queues the query as it came)."""
    if "=" not in query:
        return query
    pairs = query.split("&")
    for i, pair in enumerate(pairs):
        name, eq, _ = pair.partition("=")
        if eq and _secret_name(name):
            pairs[i] = name + "=REDACTED"
    return "&".join(pairs)


def _secret_name(name: str) -> bool:
    words = [w.lower() for w in _WORD_SPLIT.split(name) if w]
    return any(w in _SECRET_WORDS for w in words) or "".join(words) in _SECRET_WORDS


class AccessLog:
    """See the module doc. ``path`` None writes to ``stream`` (standard output by default).

    ``sample`` in (0, 1] is the share of requests logged; answers with a 5xx status are always
    logged, since they are the ones looked for. ``rng`` makes the sampling reproducible.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        sample: float = 1.0,
        buffer: int = 10000,
        interval: float = 0.2,
        rng: random.Random | None = None,
        stream: BinaryIO | None = None,
    ) -> None:
        if not 0.0 < sample <= 1.0:
            raise ValueError(f"access log sample must be in (0, 1], got {sample!r}")
        if buffer < 1:
            raise ValueError(f"access log buffer must be >= 1, got {buffer!r}")
        self.path = path
        self.sample = sample
        self.capacity = buffer
        self.interval = interval
        self._random: Callable[[], float] = (rng or random.Random()).random
        self._stream = stream
        self._file: BinaryIO | None = None
        self._queue: deque[Record] = deque()
        self._wake_at = max(buffer // 2, 1)
        self._wake = threading.Event()
        self._reopen = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._second = -1
        self._second_text = ""
        self._milli = -1
        self._milli_text = ""
        self._warned_at = -_ERROR_EVERY
        self.lines = 0  # written (the writer's count)
        self.dropped = 0  # the queue was full (the event loop's count)
        self.failed = 0  # lost to a failed write (the writer's count)

    # -- the event loop's side ----------------------------------------------------------------

    def record(self, request: Request, status: int, sent: int, seconds: float) -> None:
        """Queue one line; never blocks. The protocol's access-log hook."""
        if self.sample < 1.0 and status < 500 and self._random() >= self.sample:
            return
        queue = self._queue
        if len(queue) >= self.capacity:
            self.dropped += 1
            return
        queue.append(
            (
                time.time(),
                request.request_id,
                request.client,
                request.method,
                request.path,
                request.query,
                status,
                sent,
                seconds,
                request.route,
                request.model,
                request.upstream,
                request.reason,
                request.retries,
                request.guard_score,
                request.guard_action,
                request.stages,
            )
        )
        if len(queue) == self._wake_at:
            self._wake.set()  # half full: write now rather than at the next interval

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGUSR1, after a rotation moved it)."""
        self._reopen = True
        self._wake.set()

    # -- life ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the file (OSError if it cannot be) and start the writer."""
        self._file = self._open()
        self._thread = threading.Thread(target=self._run, name="webtorch-access-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the file."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                log.warning("access log: the writer did not finish in %.0f s", timeout)
                return
            self._thread = None
        self._close_file(self._file)
        self._file = None

    def _open(self) -> BinaryIO:
        if self.path is None:
            return self._stream if self._stream is not None else sys.stdout.buffer
        # 0640 and missing directories 0750, as nginx's logs: an admin group may read them,
        # nobody else (they name clients, paths and queries). An existing file keeps its mode.
        make_private_dir(self.path.parent, LOG_DIR)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE)
        return os.fdopen(fd, "ab")

    def _close_file(self, file: BinaryIO | None) -> None:
        if file is None:
            return
        if self.path is None:  # standard output or a given stream: not ours to close
            with contextlib.suppress(OSError, ValueError):
                file.flush()
            return
        try:
            file.close()
        except OSError as exc:
            log.warning("access log: closing %s failed: %s", self.path, exc)

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping
            if self._reopen:
                self._reopen = False
                self._do_reopen()
            try:
                self._write_queued()
            except Exception:  # the writer must outlive any one bad batch
                log.exception("access log: writing failed")
            if stopping:
                return

    def _do_reopen(self) -> None:
        if self.path is None:
            return
        try:
            new = self._open()
        except OSError as exc:
            log.error(
                "access log: cannot reopen %s (%s); still writing to the old file", self.path, exc
            )
            return
        old, self._file = self._file, new
        self._close_file(old)
        log.info("access log: reopened %s", self.path)

    def _write_queued(self) -> None:
        queue = self._queue
        count = len(queue)  # only this thread takes from the queue: these many are there
        popleft = queue.popleft
        encode = self._encode
        while count:
            # A chunk at a time: encoding holds the GIL, and the write between two chunks
            # releases it, so the event loop waits a fraction of a millisecond at most.
            chunk = min(count, _CHUNK)
            count -= chunk
            # Appended one by one, not joined from a list: each line's bytes are freed at once
            # and their memory reused, measured 3x faster than keeping a batch of them alive.
            data = bytearray()
            for _ in range(chunk):
                data += encode(popleft())
            self._write(data, chunk)
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError) as exc:
                self._lost(0, exc)

    def _write(self, data: bytearray, lines: int) -> None:
        file = self._file
        try:
            if file is None:
                raise OSError("the access log is not open")
            file.write(data)
        except (OSError, ValueError) as exc:
            self._lost(lines, exc)
            return
        self.lines += lines

    def _lost(self, lines: int, exc: Exception) -> None:
        self.failed += lines
        now = time.monotonic()
        if now - self._warned_at >= _ERROR_EVERY:
            self._warned_at = now
            log.warning("access log: writing failed (%d line(s) lost): %s", lines, exc)

    def _encode(self, record: Record) -> bytes:
        (
            at,
            request_id,
            client,
            method,
            path,
            query,
            status,
            sent,
            seconds,
            route,
            model,
            upstream,
            reason,
            retries,
            guard_score,
            guard_action,
            stages,
        ) = record
        line: dict[str, Any] = {
            "time": self._time(at),
            "request_id": request_id.decode("latin-1") if request_id else None,
            "client": client or None,
            "method": method or None,
            "path": path or None,
            "query": redact_query(query) if query else None,
            "status": status,
            "bytes": sent,
            "duration": round(seconds, 6),
            "route": route or None,
            "model": model or None,
            "upstream": upstream or None,
            "reason": reason or None,
            "retries": retries,
            "guard_score": None if guard_score is None else round(guard_score, 4),
            "guard_action": guard_action or None,
            "stages": _stages(stages) if stages else None,
        }
        try:
            return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            # A path with characters JSON cannot carry (lone surrogates): escape them.
            line["path"] = path.encode("utf-8", "backslashreplace").decode("utf-8")
            line["query"] = query.encode("utf-8", "backslashreplace").decode("utf-8")
            return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)

    def _time(self, at: float) -> str:
        """ISO 8601 in UTC with milliseconds, formatted once per millisecond (under load many
        lines share one)."""
        milli = int(at * 1000)
        if milli != self._milli:
            second, rest = divmod(milli, 1000)
            if second != self._second:
                self._second = second
                self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._milli = milli
            self._milli_text = f"{self._second_text}.{rest:03d}Z"
        return self._milli_text

    # -- metrics ------------------------------------------------------------------------------

    def metric_families(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "webtorch_access_log_lines", "Access log lines written", value=self.lines
        )
        dropped = CounterMetricFamily(
            "webtorch_access_log_dropped",
            "Access log lines lost: the writer's queue was full (buffer_full) or the write "
            "failed (write_error)",
            labels=["reason"],
        )
        dropped.add_metric(["buffer_full"], self.dropped)
        dropped.add_metric(["write_error"], self.failed)
        yield dropped


def _stages(text: str) -> dict[str, float]:
    """A pipeline request's per-stage milliseconds as an object, from its Server-Timing value
    (``Request.stages``: ``clean;dur=0.410, featurize;dur=0.200``)."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, _, duration = item.strip().partition(";dur=")
        try:
            out[name] = float(duration)
        except ValueError:
            continue  # not a pipeline's timing: nothing to report for it
    return out

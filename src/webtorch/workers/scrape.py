"""``/metrics`` for the whole server when several workers serve (issue 22 part 4).

Each worker publishes its own exposition once a second into a directory its master made for
them (under /dev/shm: memory, not disk), one file per worker slot, replaced atomically. A scrape,
whichever worker it reaches, answers that worker's live metrics merged with the others' latest
files (at most a second old): counters and histograms summed, the gauges that are amounts summed
(connections, requests in flight, memory...), every other gauge (a state, a share, a loss) the
answering worker's own, and ``webtorch_workers``, how many workers the answer sums; the
master's figures (its restarts) come from a file it writes there too. A worker's
counters leave the totals when it dies (its replacement starts from 0): a counter reset, which
Prometheus's rate() expects from any restart.

The merge (:func:`merge`) is sans-IO; :class:`Scrape` is its shell in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, cast

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from webtorch.http.messages import Request, Response
from webtorch.metrics import Metrics
from webtorch.workers.master import MASTER_METRICS

log: Final = logging.getLogger("webtorch.workers")

PUBLISH_INTERVAL: Final = 1.0  # seconds between two of a worker's published expositions

# Gauges that are amounts, so the server's is the workers' sum; any other gauge is a state, a
# rate or a setting that is the answering worker's own (or, as webtorch_guard_bans, read from
# the state the workers share: already the server's).
ADDITIVE_GAUGES: Final = frozenset(
    {
        "webtorch_http_connections",
        "webtorch_http_connections_max",
        "webtorch_upstream_inflight",
        "webtorch_upstream_connections",
        "webtorch_guard_clients",
        "webtorch_websocket_connections",  # [streams]: each worker's own connections and state
        "webtorch_streams_open",
        "webtorch_streams_stored",
        "webtorch_streams_state_bytes",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
# Each worker's webtorch_worker{slot,pid}: 1 for the one that answered, 0 for the others.
IDENTITY: Final = "webtorch_worker"
# A number as prometheus-client writes it (Go's formatting: +Inf, 1e+06...); untyped there.
_number: Final = cast(Callable[[float], str], floatToGoString)
_SUMMED_TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


class _Family:
    __slots__ = ("head", "kind", "samples")

    def __init__(self, head: list[str], kind: str) -> None:
        self.head = head  # its HELP and TYPE lines
        self.kind = kind
        self.samples: dict[str, float] = {}  # `name{labels}` -> value, in first-seen order


def merge(own: str, others: Iterable[str], master: str = "") -> list[str]:
    """The exposition lines of ``own`` (the answering worker's) merged with ``others``' (the
    other workers') and the ``master``'s.

    Line by line on the text format, as prometheus-client writes it (``# HELP``, ``# TYPE``, then
    ``name{labels} value`` lines, no timestamps): its own parser costs about 30 ms per worker's
    exposition, this about a millisecond, and a scrape runs on the event loop."""
    families: dict[str, _Family] = {}
    workers = [own, *others]
    for index, text in enumerate([*workers, master]):
        family: _Family | None = None
        summed = identity = False
        help_line = ""
        for line in text.splitlines():
            if line.startswith("# HELP "):
                help_line = line
                continue
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                family = families.get(name)
                if family is None:
                    family = families[name] = _Family([help_line, line], kind)
                summed = kind in _SUMMED_TYPES or name in ADDITIVE_GAUGES
                identity = name == IDENTITY and index > 0
                continue
            if family is None or not line or line.startswith("#"):
                continue
            key, _, number = line.rpartition(" ")
            value = 0.0 if identity else float(number)  # identity: listed, did not answer
            have = family.samples.get(key)
            if have is None:
                family.samples[key] = value
            elif summed and not key.split("{", 1)[0].endswith("_created"):
                family.samples[key] = have + value
            elif key.split("{", 1)[0].endswith("_created"):
                family.samples[key] = min(have, value)
            # else: a gauge that is a state: the first seen (own comes first) stands
    lines: list[str] = []
    for family in families.values():
        lines += family.head
        lines += [f"{key} {_number(value)}" for key, value in family.samples.items()]
    lines += [
        "# HELP webtorch_workers Workers whose metrics this answer sums (server.workers > 1)",
        "# TYPE webtorch_workers gauge",
        f"webtorch_workers {_number(len(workers))}",
    ]
    return lines


def render(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


class Scrape:
    """A worker's publishing (every second) and its /metrics handler (the whole server)."""

    def __init__(self, metrics: Metrics, directory: Path, slot: int, count: int) -> None:
        self.metrics = metrics
        self.directory = directory
        self.slot = slot
        self.count = count
        self._timer: asyncio.TimerHandle | None = None

    def path(self, slot: int) -> Path:
        return self.directory / f"{slot}.prom"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.publish()
        self._timer = loop.call_later(PUBLISH_INTERVAL, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.publish()
        self._timer = loop.call_later(PUBLISH_INTERVAL, self._tick, loop)

    def publish(self) -> None:
        """This worker's exposition, replacing its last one whole (a reader never sees half)."""
        target = self.path(self.slot)
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_bytes(self.metrics.exposition())
            os.replace(temporary, target)
        except OSError as exc:  # the others' totals go stale; this worker serves on
            log.warning("cannot publish this worker's metrics to %s: %s", target, exc)

    def others(self) -> list[str]:
        texts = []
        for slot in range(self.count):
            if slot == self.slot:
                continue
            try:
                texts.append(self.path(slot).read_text())
            except OSError:
                continue  # not published yet (starting)
        return texts

    def handle(self, request: Request) -> Response:
        own = self.metrics.exposition().decode()
        try:
            master = (self.directory / MASTER_METRICS).read_text()
        except OSError:
            master = ""
        lines = merge(own, self.others(), master)
        return Response(200, render(lines), CONTENT_TYPE_LATEST.encode())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

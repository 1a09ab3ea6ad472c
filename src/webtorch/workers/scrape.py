"""``/metrics`` for the whole server when several workers serve (issue 22 part 4).

Each worker publishes its own exposition once a second into a directory its master made for
them (under /dev/shm: memory, not disk), one file per worker slot, replaced atomically. A scrape,
whichever worker it reaches, answers that worker's live metrics merged with the others' latest
files (at most a second old): counters and histograms summed, the gauges that are amounts summed
(connections, requests in flight, memory...), every other gauge (a state, a share, a loss) the
answering worker's own, and ``webtorch_workers``, how many workers the answer sums. A worker's
counters leave the totals when it dies (its replacement starts from 0): a counter reset, which
Prometheus's rate() expects from any restart.

The merge (:func:`merge`) is sans-IO; :class:`Scrape` is its shell in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from webtorch.http.messages import Request, Response
from webtorch.metrics import Metrics

log: Final = logging.getLogger("webtorch.workers")

PUBLISH_INTERVAL: Final = 1.0  # seconds between two of a worker's published expositions

# Gauges that are amounts, so the server's is the workers' sum; any other gauge is a state, a
# rate or a setting that is the answering worker's own.
ADDITIVE_GAUGES: Final = frozenset(
    {
        "webtorch_http_connections",
        "webtorch_http_connections_max",
        "webtorch_upstream_inflight",
        "webtorch_upstream_connections",
        "webtorch_guard_bans",
        "webtorch_guard_clients",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
# Each worker's webtorch_worker{slot,pid}: 1 for the one that answered, 0 for the others.
IDENTITY: Final = "webtorch_worker"
_SUMMED_TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

_Key = tuple[str, tuple[tuple[str, str], ...]]


def merge(own: str, others: Iterable[str]) -> list[Metric]:
    """The families of ``own`` (the answering worker's exposition) merged with ``others``'."""
    families: dict[str, Metric] = {}
    samples: dict[str, dict[_Key, Sample]] = {}
    count = 0
    for index, text in enumerate([own, *others]):
        count += 1
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                samples[family.name] = {}
            summed = family.type in _SUMMED_TYPES or family.name in ADDITIVE_GAUGES
            into = samples[family.name]
            for sample in family.samples:
                if family.name == IDENTITY and index > 0:
                    sample = sample._replace(value=0.0)  # listed, but not the one that answered
                key = (sample.name, tuple(sorted(sample.labels.items())))
                have = into.get(key)
                if have is None:
                    into[key] = sample
                elif sample.name.endswith("_created"):
                    into[key] = have._replace(value=min(have.value, sample.value))
                elif summed:
                    into[key] = have._replace(value=have.value + sample.value)
                # else: a gauge that is a state: the first seen (own comes first) stands
    for name, family in families.items():
        family.samples = list(samples[name].values())
    workers = GaugeMetricFamily(
        "webtorch_workers", "Workers whose metrics this answer sums (server.workers > 1)"
    )
    workers.add_metric([], count)
    return [*families.values(), workers]


def render(families: list[Metric]) -> bytes:
    class _Fixed:
        def collect(self) -> Iterator[Metric]:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry)


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
        return Response(200, render(merge(own, self.others())), CONTENT_TYPE_LATEST.encode())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

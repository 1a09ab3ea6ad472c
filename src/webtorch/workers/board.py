"""``/dashboard`` for the whole server when several workers serve (issue 22 part 4).

The same scheme as ``/metrics`` (scrape.py): after each of its once-a-second timeline samples, a
worker publishes that sample and a snapshot of its current state (the dashboard's upstreams,
models, guard and pipeline totals) to a file of its own in its master's private directory under
/dev/shm, replaced atomically; then it merges its sample with the others' newest into the
server's sample of that second and keeps it in a ring of its own. The dashboard's stats, from
whichever worker a poll reaches, are that ring and the current snapshots merged (the others' at
most a second old).

A merged sample's ``seq`` is its second on the wall clock, so every worker numbers the same
second alike and a page whose polls land on another worker (a new connection) asks for what it
lacks. Rates and amounts are summed; the percentiles come from each worker's latency quantiles
weighted by its count; states (an upstream's health, the guard's mode and bans, which the
workers share) are the answering worker's. Each merged sample has ``workers``: each worker's
requests, errors and connections, the per-worker breakdown the page draws.

:func:`merge_samples` and :func:`merge_current` are sans-IO; :class:`Board` is the shell.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from webtorch import __version__
from webtorch.observe.timeline import HISTORY, Sample, Timeline

log: Final = logging.getLogger("webtorch.workers")

# What a worker's present state holds (observe/dashboard.py's Dashboard.current).
CURRENT_KEYS: Final = frozenset({"upstreams", "models", "guard", "pipelines"})
STALE: Final = 3.0  # seconds: an older published sample is a dead or stuck worker's, left out
Published = dict[str, Any]


def _weighted_percentiles(
    spreads: Iterable[tuple[int, list[float]]],
) -> tuple[float | None, float | None, float | None]:
    """p50, p90, p99 of the union of several workers' latencies, each given as its count and its
    101 percentiles (0, 1, ... 100): every point stands for count/101 of its worker's values."""
    points: list[float] = []
    weights: list[float] = []
    for count, quantiles in spreads:
        if count > 0 and quantiles:
            points += quantiles
            weights += [count / len(quantiles)] * len(quantiles)
    if not points:
        return None, None, None
    order = np.argsort(np.asarray(points))
    values = np.asarray(points)[order]
    cumulative = np.cumsum(np.asarray(weights)[order])
    total = float(cumulative[-1])
    out = []
    for p in (0.5, 0.9, 0.99):
        index = min(int(np.searchsorted(cumulative, p * total)), len(values) - 1)
        out.append(float(values[index]))
    return out[0], out[1], out[2]


def _sum_keys(items: Iterable[dict[str, float] | None]) -> dict[str, float] | None:
    total: dict[str, float] | None = None
    for item in items:
        if item is None:
            continue
        if total is None:
            total = {}
        for key, value in item.items():
            total[key] = round(total.get(key, 0.0) + value, 3)
    return total


def _group(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """One upstream group's second: the workers' attempts summed, shares from the sums, mean
    latency weighted by attempts, each server's state the answering worker's (shared marks)."""
    own = groups[0]
    servers: dict[str, Any] = {}
    weighted: dict[str, tuple[float, float]] = {}
    for group in groups:
        for address, server in group["servers"].items():
            merged = servers.get(address)
            if merged is None:
                merged = servers[address] = dict(server)
                merged["rate"] = merged["errors"] = 0.0
                merged["inflight"] = 0
            merged["rate"] = round(merged["rate"] + server["rate"], 3)
            merged["errors"] = round(merged["errors"] + server["errors"], 3)
            merged["inflight"] += server["inflight"]
            if server["latency"] is not None and server["rate"] > 0:
                total, weight = weighted.get(address, (0.0, 0.0))
                weighted[address] = (
                    total + server["latency"] * server["rate"],
                    weight + server["rate"],
                )
    rates = sum(server["rate"] for server in servers.values())
    for address, server in servers.items():
        server["share"] = server["rate"] / rates if rates > 0 else 0.0
        total, weight = weighted.get(address, (0.0, 0.0))
        server["latency"] = total / weight if weight > 0 else None
    predicted = [g["predicted"] for g in groups if g["predicted"] is not None]
    observed = [g["observed"] for g in groups if g["observed"] is not None]
    return {
        "servers": servers,
        "reasons": _sum_keys(g["reasons"] for g in groups) or {},
        "predicted": sum(predicted) / len(predicted) if predicted else own["predicted"],
        "observed": sum(observed) / len(observed) if observed else own["observed"],
    }


def _model(models: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(m["rows"] for m in models)
    batches = sum(m["rows"] / m["batch"] for m in models if m["batch"])
    # The loss is the trainer's (one worker trains a model): the one that stepped, else any.
    losses = [m["loss"] for m in models if m["loss"] is not None and m["train_steps"] > 0]
    losses = losses or [m["loss"] for m in models if m["loss"] is not None]
    return {
        "rate": round(sum(m["rate"] for m in models), 3),
        "rows": round(rows, 3),
        "batch": rows / batches if batches > 0 else None,
        "train_steps": round(sum(m["train_steps"] for m in models), 3),
        "train_rows": round(sum(m["train_rows"] for m in models), 3),
        "loss": losses[0] if losses else None,
    }


def _by_name(parts: Iterable[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each name's values, one per part that has it, in the parts' order."""
    out: dict[str, list[Any]] = {}
    for part in parts:
        for name, value in part.items():
            out.setdefault(name, []).append(value)
    return dict(sorted(out.items()))


def merge_samples(workers: list[Published], seq: int) -> Sample:
    """The server's sample of one second from each worker's published one (the answering
    worker's first: its time and the states are its own)."""
    samples = [w["sample"] for w in workers]
    own = samples[0]
    requests = [s["requests"] for s in samples]
    p50, p90, p99 = _weighted_percentiles((w["latency"][0], w["latency"][1]) for w in workers)
    return {
        "seq": seq,
        "t": own["t"],
        "requests": {
            "rate": round(sum(r["rate"] for r in requests), 3),
            "errors": round(sum(r["errors"] for r in requests), 3),
            "client_errors": round(sum(r["client_errors"] for r in requests), 3),
            "p50": p50,
            "p90": p90,
            "p99": p99,
        },
        "connections": sum(s["connections"] for s in samples),
        "upstreams": {
            name: _group(groups)
            for name, groups in _by_name(s["upstreams"] for s in samples).items()
        },
        "models": {
            name: _model(models) for name, models in _by_name(s["models"] for s in samples).items()
        },
        "guard": _sum_keys(s["guard"] for s in samples),
        "workers": {
            str(w["slot"]): {
                "pid": w["pid"],
                "rate": w["sample"]["requests"]["rate"],
                "errors": w["sample"]["requests"]["errors"],
                "connections": w["sample"]["connections"],
            }
            for w in sorted(workers, key=lambda w: int(w["slot"]))
        },
    }


def merge_current(currents: list[dict[str, Any]]) -> dict[str, Any]:
    """The dashboard's current state from each worker's (the answering worker's first)."""
    own = currents[0]
    upstreams: dict[str, Any] = {}
    for name, groups in _by_name(c["upstreams"] for c in currents).items():
        group = dict(groups[0])
        inflight: Counter[str] = Counter()
        for g in groups:
            for server in g["servers"]:
                inflight[server["address"]] += server["inflight"]
        group["servers"] = [{**s, "inflight": inflight[s["address"]]} for s in group["servers"]]
        if group.get("guard_backoffs") is not None:
            # The learned policy's guard rail, one per worker: back-offs of all, the longest on.
            group["guard_backoffs"] = sum(g.get("guard_backoffs") or 0 for g in groups)
            group["backed_off_for"] = max(g.get("backed_off_for") or 0.0 for g in groups)
        upstreams[name] = group
    models: dict[str, Any] = {}
    for name, entries in _by_name(c["models"] for c in currents).items():
        trainer = max(entries, key=lambda m: m["steps"])  # the worker that trains it
        models[name] = {
            "trainable": any(m["trainable"] for m in entries),
            "steps": trainer["steps"],
            "loss": trainer["loss"],
        }
    guard = own["guard"]
    if guard is not None:
        blocked: Counter[str] = Counter()
        for c in currents:
            if c["guard"] is not None:
                for entry in c["guard"]["top_blocked"]:
                    blocked[entry["client"]] += entry["blocked"]
        guard = {
            **guard,  # mode, and bans: the shared state's, already the server's
            "clients": sum(c["guard"]["clients"] for c in currents if c["guard"] is not None),
            "top_blocked": [{"client": k, "blocked": n} for k, n in blocked.most_common(10)],
        }
    pipelines: dict[str, list[dict[str, Any]]] = {}
    for name, runs in _by_name(c["pipelines"] for c in currents).items():
        stages: dict[str, dict[str, Any]] = {}
        for stages_of_one in runs:
            for stage in stages_of_one:
                have = stages.get(stage["stage"])
                if have is None:
                    stages[stage["stage"]] = dict(stage)
                else:
                    for key, value in stage.items():
                        if key != "stage":
                            have[key] += value
        pipelines[name] = list(stages.values())
    plugins: dict[tuple[str, str], dict[str, Any]] = {}
    for c in currents:  # per plugin and phase, summed (a state without plugins has none)
        for row in c.get("plugins", ()):
            have = plugins.setdefault((row["plugin"], row["phase"]), {**row, **_ZERO_PLUGIN})
            for key in _ZERO_PLUGIN:
                have[key] += row[key]
    return {
        "upstreams": upstreams,
        "models": models,
        "guard": guard,
        "pipelines": pipelines,
        "plugins": [plugins[key] for key in sorted(plugins)],
    }


_ZERO_PLUGIN: Final = {"calls": 0, "errors": 0, "timeouts": 0, "seconds": 0.0}


class Board:
    """A worker's publishing (after each timeline sample) and its dashboard stats (the whole
    server's)."""

    def __init__(
        self,
        timeline: Timeline,
        current: Callable[[], dict[str, Any]],
        directory: Path,
        slot: int,
        count: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeline = timeline
        self.current = current
        self.directory = directory
        self.slot = slot
        self.count = count
        self._clock = clock
        self.samples: deque[Sample] = deque(maxlen=HISTORY)
        self.seq = 0
        timeline.quantiles = (0, [])  # from now on the timeline keeps its second's quantiles
        timeline.listeners.append(self.sampled)

    def path(self, slot: int) -> Path:
        return self.directory / f"{slot}.board.json"

    def published(self, sample: Sample) -> Published:
        quantiles = self.timeline.quantiles
        return {
            "slot": self.slot,
            "pid": os.getpid(),
            "started": self.timeline.started,
            "requests": self.timeline.requests,
            "sample": sample,
            "latency": list(quantiles) if quantiles is not None else [0, []],
            "current": self.current(),
        }

    def sampled(self, sample: Sample) -> None:
        """After the timeline's sample: publish it, and keep the server's sample of the second."""
        own = self.published(sample)
        target = self.path(self.slot)
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_bytes(orjson.dumps(own))
            os.replace(temporary, target)
        except OSError as exc:  # the others' dashboards miss this worker; it serves on
            log.warning("cannot publish this worker's dashboard to %s: %s", target, exc)
        # The wall clock's second, never going back (an NTP step must not renumber history).
        self.seq = max(int(sample["t"]), self.seq + 1)
        others = self.others(sample["t"])
        try:
            merged = merge_samples([own, *others], self.seq)
        except (KeyError, TypeError, ValueError) as exc:  # another version's shape (an upgrade)
            log.warning("cannot merge the other workers' dashboards: %s", exc)
            merged = merge_samples([own], self.seq)
        self.samples.append(merged)

    def others(self, now: float) -> list[Published]:
        """The other workers' newest publications, less those older than :data:`STALE` (a
        worker dead and not yet replaced) and any that does not read as one: a listener of the
        metrics' compaction tick must not raise, or that tick would stop."""
        found = []
        for slot in range(self.count):
            if slot == self.slot:
                continue
            try:
                other = orjson.loads(self.path(slot).read_bytes())
                fresh = now - float(other["sample"]["t"]) <= STALE
                current = other["current"]
                if fresh and other["latency"] and current.keys() >= CURRENT_KEYS:
                    found.append(other)
            except OSError:
                continue  # not published yet (starting)
            except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
                log.warning("worker %d's dashboard file does not read: %s", slot, exc)
        return found

    def body(self, since: int) -> dict[str, Any]:
        """The stats document (observe/dashboard.py's shape) of the whole server."""
        now = self._clock()
        others = self.others(now)
        newer = [s for s in self.samples if s["seq"] > since]
        current = merge_current([self.current(), *(o["current"] for o in others)])
        return {
            "version": __version__,
            # The oldest worker's start: the same from every worker while it lives.
            "started": min([self.timeline.started, *(float(o["started"]) for o in others)]),
            "now": self.samples[-1]["t"] if self.samples else now,
            "interval": 1.0,
            "seq": self.seq,
            "samples": newer,
            **current,
            "workers": [
                {"slot": self.slot, "pid": os.getpid(), "requests": self.timeline.requests},
                *({"slot": o["slot"], "pid": o["pid"], "requests": o["requests"]} for o in others),
            ],
        }

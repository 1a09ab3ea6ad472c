"""What the load generator records per request, and the CSV file it is kept in.

One row per request, in order of intended send time:

- ``t``: intended send time, seconds since the measured period's start (warm-up rows are not
  written);
- ``latency``: seconds from the intended send time (not the actual one: no coordinated
  omission) to the whole answer, or to the failure;
- ``status``: the HTTP status, 0 when there was none;
- ``outcome``: ``ok`` (2xx), ``http`` (another status), ``timeout`` (no answer within the
  scenario's timeout) or ``error`` (connection refused, reset or closed);
- ``upstream``: the ``x-upstream`` header of the answer (empty when none);
- ``key``, ``size``: the request's key (empty when none) and body bytes;
- ``lag``: seconds between the intended send time and the moment the generator got to it; its
  tail says whether the generator kept up.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("t", "latency", "status", "outcome", "upstream", "key", "size", "lag")
OUTCOMES = ("ok", "http", "timeout", "error")


@dataclass(frozen=True, slots=True)
class Record:
    t: float
    latency: float
    status: int
    outcome: str
    upstream: str
    key: str
    size: int
    lag: float

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Records:
    rows: list[Record] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def write(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for r in self.rows:
                writer.writerow(
                    (
                        f"{r.t:.6f}",
                        f"{r.latency:.6f}",
                        r.status,
                        r.outcome,
                        r.upstream,
                        r.key,
                        r.size,
                        f"{r.lag:.6f}",
                    )
                )

    @classmethod
    def read(cls, path: Path) -> Records:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(header) != COLUMNS:
                raise ValueError(f"{path}: not a lab records file (header {header})")
            rows = [
                Record(
                    float(t),
                    float(latency),
                    int(status),
                    outcome,
                    upstream,
                    key,
                    int(size),
                    float(lag),
                )
                for t, latency, status, outcome, upstream, key, size, lag in reader
            ]
        return cls(rows)

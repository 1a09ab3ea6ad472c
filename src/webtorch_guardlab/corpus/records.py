"""One labelled request of the guard's corpus, and the JSONL files the corpus is kept in.

A :class:`Sample` is a whole HTTP/1.1 request (method, target, headers in wire order, body) plus
what the detector learns and is scored on:

- ``label``: 0 benign, 1 attack;
- ``family``: ``benign`` or an attack family of :data:`webtorch_guardlab.corpus.payloads.FAMILIES`;
- ``source``: where it came from: ``benign/<scenario>`` for benign traffic, the payload list's
  package for attacks (``fray``, ``sqlmap``, ``wapiti``, ``wfuzz``, ``dirb``, or ``fixture`` in
  tests);
- ``client``: the sending IP address (many users may share one, as behind a NAT);
- ``t``: seconds from the start of the split's timeline;
- ``split``: ``train`` or ``test``;
- ``position``: where the payload sits (``query``, ``path``, ``form``, ``json``, ``xml``,
  ``multipart``, ``cookie``, ``header``); empty for benign requests.

On disk one JSON object a line. Header values and targets are ASCII by construction; the body is
kept as text when it is UTF-8 (``body``), else base64 (``body_b64``), so that files stay
readable and every byte survives.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "test")
POSITIONS = ("query", "path", "form", "json", "xml", "multipart", "cookie", "header")

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    method: str
    target: str
    headers: Headers
    body: bytes
    label: int
    family: str
    source: str
    client: str
    t: float
    split: str
    position: str = ""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def to_http(self) -> bytes:
        """The request as it goes on the wire (HTTP/1.1, CRLF line ends)."""
        head = f"{self.method} {self.target} HTTP/1.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        return head.encode("ascii") + b"\r\n" + self.body

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "method": self.method,
            "target": self.target,
            "headers": [[k, v] for k, v in self.headers],
        }
        try:
            d["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            d["body_b64"] = base64.b64encode(self.body).decode("ascii")
        d.update(
            label=self.label,
            family=self.family,
            source=self.source,
            client=self.client,
            t=round(self.t, 6),
            split=self.split,
            position=self.position,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        if "body_b64" in d:
            body = base64.b64decode(d["body_b64"])
        else:
            body = str(d.get("body", "")).encode("utf-8")
        return cls(
            method=str(d["method"]),
            target=str(d["target"]),
            headers=tuple((str(k), str(v)) for k, v in d["headers"]),
            body=body,
            label=int(d["label"]),
            family=str(d["family"]),
            source=str(d["source"]),
            client=str(d["client"]),
            t=float(d["t"]),
            split=str(d["split"]),
            position=str(d.get("position", "")),
        )


def write_jsonl(path: Path, samples: Iterable[Sample]) -> int:
    """Writes ``samples`` one a line; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict(), ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[Sample]:
    """Reads a file written by :func:`write_jsonl`; a bad line raises ValueError naming it."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Sample.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a corpus sample ({exc})") from None

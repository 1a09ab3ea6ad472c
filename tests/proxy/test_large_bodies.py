"""A gigabyte through the proxy each way, in bounded memory: the proxy is a subprocess, and its
peak resident memory (VmHWM) is read from /proc after the transfers."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import serve_process
from tests.proxy.upstreams import PATTERN, upstreams

GIB = 1 << 30
CHUNK = len(PATTERN)


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def pieces(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = PATTERN[: min(CHUNK, total - sent)]
        sent += len(piece)
        yield piece


def test_a_gigabyte_each_way_in_bounded_memory(tmp_path: Path) -> None:
    with upstreams("a") as (a,):
        path = tmp_path / "proxy.toml"
        path.write_text(
            f"""
[upstreams.backend]
servers = ["{a.address}"]

[[routes]]
prefix = "/"
upstream = "backend"
max_body = {2 * GIB}
"""
        )
        with serve_process(path) as proc:
            pid = proc.pid
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=60)
            conn.request("GET", "/")  # warm up: what a served request costs, before the big ones
            assert conn.getresponse().read() == b"a"
            baseline = vm_kib(pid, "VmRSS")

            # Upload, chunked: the upstream counts the bytes (no hash: the time is the proxy's).
            conn.request("POST", "/echo?hash=0", body=pieces(GIB), encode_chunked=True)
            answer = json.loads(conn.getresponse().read())
            assert answer["body_bytes"] == GIB

            # Download with a Content-Length, read in pieces by a client that keeps nothing.
            conn.request("GET", f"/bytes?n={GIB}")
            resp = conn.getresponse()
            assert resp.getheader("content-length") == str(GIB)
            received = 0
            while data := resp.read(1 << 20):
                received += len(data)
            assert received == GIB
            conn.close()

            peak = vm_kib(pid, "VmHWM")
            # Buffers are bounded by high-water marks of a few hundred KiB per direction; allow
            # generous slack for the allocator, far below the 1 GiB that went through.
            assert peak - baseline < 64 * 1024, f"peak grew by {(peak - baseline) // 1024} MiB"

"""CPU cost per request of WebTorch's hot path, without sockets: N connections wired to fake
transports each send one request per round; the loop runs the batch; repeat. Reports CPU
microseconds per request (process time: steadier than wrk here, though a busy neighbour on the
other core still moves it by 10-20%; compare builds by running them alternately, e.g. with
PYTHONPATH pointing at a worktree's src/).

    taskset -c 0 .venv/bin/python benchmarks/hotpath.py [--path /models/xor/predict] [--rounds 2000]

NO_MODELS=1 leaves the model out of the config (for /fixed and /proxy): torch is not loaded, so
the process starts in a second, as a run under valgrind needs; NO_OBSERVER=1 leaves out the
per-request metrics observer, to see what it costs; REQUEST_ID=1
gives every request an X-Request-Id (server.request_id, on in a served config); ACCESS_LOG=FILE
writes the access log there (its writer thread's CPU counts too). GUARD=bucket puts the guard's
token bucket in front (no detector), GUARD=full the bucket and the shipped detector (enforcing),
GUARD=monitor the same in monitor mode, GUARD=surge the bucket and the surge defence; each
connection is its own client address, and the request carries a browser's headers and a fresh
query string (as the live benign mix does), so the detector's per-part cache hits on the headers
and misses on the query. SHARED=1 gives the app the shared-memory state store a worker of
`server.workers > 1` has (webtorch/shared/): the guard's buckets, bans and surge and the proxy's
upstream marks go through it instead of the in-process one. PLUGINS=request,response,... puts one
no-op plugin joining those phases in front (PLUGINS=all: every per-request phase; docs/PLUGINS.md):
what a plugin costs per phase, with nothing of its own to do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any

import uvloop

from webtorch import config
from webtorch.app import App
from webtorch.http.protocol import HttpProtocol
from webtorch.observe.access_log import AccessLog
from webtorch.plugins.host import Base, install

XOR = Path(__file__).resolve().parent.parent / "src" / "webtorch" / "examples" / "xor.py"
BODIES = {
    "/models/xor/predict": b'{"inputs": [[0, 1]]}',
    "/v2/models/xor/infer": (
        b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[0,1]}]}'
    ),
    "/fixed": b"{}",
    # Training with durability "none": the step, without the disk.
    "/models/xor/train": b'{"inputs": [[0, 1]], "targets": [[1]]}',
    # Proxied to an upstream whose connections are fake transports answering at once, like
    # nginx's `return 200` (its real header set): the proxy's own work on both sides.
    "/proxy": b"",
    # Pipelines (benchmarks/models/pipeline_*.py): one loop stage passing records through;
    # and the xor model as a pipeline's one stage (records in, rows out).
    "/pipelines/one/predict": b'{"records": [[0, 1]]}',
    "/pipelines/xor/predict": b'{"records": [[0, 1]]}',
}
MODELS = Path(__file__).resolve().parent / "models"
UPSTREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 02:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)


class FakeTransport:
    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.written = 0
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 5555) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def can_write_eof(self) -> bool:
        return False


class FakeUpstreamTransport(FakeTransport):
    """An upstream connection whose server answers every request on the next loop turn."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.conn = conn
        self.loop = loop

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.conn.data_received, UPSTREAM_RESPONSE)


def guard_config(kind: str) -> dict[str, Any]:
    if kind in ("", "none"):
        return {}
    # A rate no client of this loop reaches: the bucket's bookkeeping runs, nothing is refused.
    guard: dict[str, Any] = {"mode": "enforce", "rate": 1e9, "burst": 1e9, "model": "none"}
    if kind == "surge":  # the bucket and the surge defence (never refusing either)
        guard["surge_rate"] = 1e9
    if kind in ("full", "monitor"):
        del guard["model"]
        guard["mode"] = "enforce" if kind == "full" else "monitor"
    return {"guard": guard}


NOOP_PHASES = {
    "request": "def request(self, ctx):\n        return None",
    "request_body": "def request_body(self, ctx, body):\n        return None",
    "pick": "def pick(self, ctx, candidates):\n        return None",
    "response": "def response(self, ctx, response):\n        return None",
    "response_body": "def response_body(self, ctx, chunk, end):\n        return None",
    "log": "def log(self, ctx):\n        return None",
}


def plugins_config(spec: str) -> dict[str, Any]:
    """One no-op plugin joining the phases named (comma-separated, or "all")."""
    if not spec:
        return {}
    import tempfile

    phases = list(NOOP_PHASES) if spec == "all" else spec.split(",")
    methods = "\n\n    ".join(NOOP_PHASES[p] for p in phases)
    path = Path(tempfile.mkdtemp()) / "noop.py"
    path.write_text(f"class Noop:\n    {methods}\n\n\nplugin = Noop()\n")
    return {"plugins": [{"path": str(path)}]}


def pipelines_config(path: str) -> dict[str, Any]:
    """The pipeline the path names (only then: the other paths measure as before)."""
    if not path.startswith("/pipelines/"):
        return {}
    name = path.split("/")[2]
    return {"pipelines": {name: {"path": str(MODELS / f"pipeline_{name}.py")}}}


async def run(path: str, conns: int, rounds: int) -> None:
    models = {
        "xor": {
            "path": str(XOR),
            "train": {"enabled": True, "durability": "none", "max_batch": conns},
        }
    }
    if os.environ.get("NO_MODELS"):
        assert path in ("/fixed", "/proxy"), "NO_MODELS=1 is for the paths without a model"
        models = {}
    cfg = config.from_dict(
        {
            "models": models,
            "upstreams": {
                "backend": {
                    "servers": ["127.0.0.1:9"],
                    "keepalive": 2 * conns,
                    "max_requests_per_connection": 0,
                }
            },
            **guard_config(os.environ.get("GUARD", "")),
            "routes": [
                {"path": "/fixed", "return": 200, "body": "{}"},
                {"path": "/proxy", "upstream": "backend"},
            ],
            **pipelines_config(path),
            **plugins_config(os.environ.get("PLUGINS", "")),
        }
    )
    app = App(cfg)
    region = None
    if os.environ.get("SHARED"):
        from webtorch.shared.memory import Region, SharedStore

        region = Region.create(cfg.guard.max_clients if cfg.guard is not None else 0)
        app.shared = SharedStore(region, 0, 2)
    loop = asyncio.get_running_loop()
    handler = app.build_handler(loop)
    from webtorch.http.state import ServerState

    observer = None if os.environ.get("NO_OBSERVER") else app.metrics.observe_request
    if cfg.guard is not None:
        app._guard(cfg.guard)  # as App.start puts it: the first plugin
    access_log = None
    if os.environ.get("ACCESS_LOG"):
        access_log = AccessLog(Path(os.environ["ACCESS_LOG"]))
        access_log.open()
    log_hook = access_log.record if access_log is not None else None
    state = ServerState(
        handler,
        observer=observer,
        access_log=log_hook,
        request_ids=bool(os.environ.get("REQUEST_ID")),
    )
    assert app.proxies is not None
    # The plugins (the guard first) as App.start installs them; nothing without any.
    install(app.plugins, state, Base(handler, log_hook, None), app.proxies.groups.values())
    body = BODIES[path]
    raw = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    if path == "/proxy":
        # wrk's request, and a pool already holding one warm connection per client.
        raw = b"GET /proxy HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
        from webtorch.http.client.connection import UpstreamConnection

        assert app.proxies is not None
        pool = app.proxies.groups["backend"].pools[0]
        for _ in range(2 * conns):  # twice: a round may start before the last one released
            conn = UpstreamConnection(pool)
            conn.connection_made(FakeUpstreamTransport(conn, loop))  # type: ignore[arg-type]
            pool.idle.append(conn)
    protos = []
    transports = []
    for _ in range(conns):
        proto = HttpProtocol(state, loop)
        tr = FakeTransport(f"127.1.{len(protos) // 250}.{len(protos) % 250 + 1}")
        proto.connection_made(tr)  # type: ignore[arg-type]
        protos.append(proto)
        transports.append(tr)

    browser = bool(os.environ.get("GUARD"))  # GUARD=none: the same requests, no guard
    sent = 0

    def request() -> bytes:
        if not browser:
            return raw
        nonlocal sent
        sent += 1
        return (
            b"POST %s?session=%08x&ts=%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            b"Chrome/131.0 Safari/537.36\r\nAccept: application/json\r\n"
            b"Accept-Language: en-US,en;q=0.9\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (path.encode(), sent * 2654435761 % 2**32, 1_764_000_000 + sent, len(body), body)
        )

    async def round_() -> None:
        for proto in protos:
            proto.data_received(request())
        for _ in range(4):  # let call_soon batches run
            await asyncio.sleep(0)

    for _ in range(50):
        await round_()
    # As App.start does once the server is up (see its comment).
    gc.freeze()
    if os.environ.get("GC_THRESHOLD"):
        gc.set_threshold(int(os.environ["GC_THRESHOLD"]))
    t0 = time.process_time()
    w0 = time.perf_counter()
    for _ in range(rounds):
        await round_()
    if access_log is not None:
        access_log.close()  # its last lines are part of the cost
    cpu = time.process_time() - t0
    wall = time.perf_counter() - w0
    n = conns * rounds
    answered = sum(t.written for t in transports) - conns * 50
    assert answered == n, (answered, n)
    print(f"{path}: {1e6 * cpu / n:.2f} us CPU/request, {n / wall:,.0f} req/s (no sockets)")
    if access_log is not None:
        print(f"access log: {access_log.lines} lines written, {access_log.dropped} dropped")
    if region is not None:
        region.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", default="/models/xor/predict", choices=sorted(BODIES))
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    uvloop.run(run(args.path, args.conns, args.rounds))


if __name__ == "__main__":
    main()

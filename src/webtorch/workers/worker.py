"""One worker of a master (``python -m webtorch.workers.worker``, started by master.py only).

It is the single server (app.py's App, the same code path) with three differences: its config
is the text its master validated (a descriptor), it listens on its master's socket or on one of
its own beside the other workers' (SO_REUSEPORT), and its event loop beats on a pipe to the
master. It dies with its master: PR_SET_PDEATHSIG sends it SIGTERM (so it drains) when the master
exits, and a heartbeat write that finds no reader does the same, where PDEATHSIG is not had.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Final

import uvloop
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from webtorch import config
from webtorch.app import App
from webtorch.errors import ConfigError, ModelLoadError
from webtorch.http.server import HttpServer
from webtorch.serve.trainers import Trainers
from webtorch.shared.memory import Region, SharedStore
from webtorch.workers.board import Board
from webtorch.workers.master import SPEC
from webtorch.workers.scrape import Scrape

log: Final = logging.getLogger("webtorch.workers")

_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h
_NO_DASHBOARD: Final[dict[str, object]] = {
    "upstreams": {},
    "models": {},
    "guard": None,
    "pipelines": {},
}


def beat_interval(heartbeat_timeout: float) -> float:
    """Seconds between two beats: several per timeout, so one late tick is never a miss."""
    return min(1.0, heartbeat_timeout / 4)


class Heartbeat:
    """Writes ``R`` (ready) and then ``.`` on every tick of the event loop: a loop that is stuck
    (a model's forward pass that never returns on it) stops beating, and the master replaces it."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.fd = fd
        self.loop = loop
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None
        os.set_blocking(fd, False)

    def start(self) -> None:
        self._write(b"R")
        self._timer = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        if self._write(b"."):
            self._timer = self.loop.call_later(self.interval, self._tick)

    def _write(self, byte: bytes) -> bool:
        try:
            os.write(self.fd, byte)
        except BlockingIOError:
            pass  # the master has 64 KiB of beats unread: it is busy, and knows we live
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            log.error("the master is gone: draining and exiting")
            os.kill(os.getpid(), signal.SIGTERM)  # the app's own graceful stop
            return False
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def identity(slot: int, pid: int) -> GaugeMetricFamily:
    """Which worker answered a scrape (its /metrics are its own: issue 22 part 4 sums them)."""
    family = GaugeMetricFamily(
        "webtorch_worker", "The worker that answered (server.workers > 1)", labels=["slot", "pid"]
    )
    family.add_metric([str(slot), str(pid)], 1)
    return family


def shared_families(store: SharedStore) -> list[GaugeMetricFamily | CounterMetricFamily]:
    """The shared state's health: what a full table forgot (the server's: one count in the
    region, so a gauge, which a merged scrape does not sum) and locks taken over (this worker's)."""
    return [
        GaugeMetricFamily(
            "webtorch_shared_evicted",
            "Clients the shared state forgot because their set of slots was full (whole server)",
            value=store.evictions(),
        ),
        CounterMetricFamily(
            "webtorch_shared_locks_taken_over",
            "Shared-state locks found held past their timeout (a worker killed holding one)",
            value=store.taken_over(),
        ),
    ]


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # stopped while starting: nothing was served, nothing to drain


def _die_with(master: int) -> None:
    """SIGTERM when the master exits (Linux), and exit now if it already did."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("PR_SET_PDEATHSIG: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != master:
        raise SystemExit(0)  # the master died before the request was made


def main() -> int:
    spec: dict[str, Any] = json.loads(os.environ.pop(SPEC))
    slot = int(spec["slot"])
    logging.basicConfig(
        level=str(spec["log_level"]).upper(),
        format=f"%(levelname)s %(name)s (worker {slot}): %(message)s",
    )
    # Until the app's loop handles them (App.run): a reload or reopen is not lost (the master
    # sends SIGHUP again once this worker is ready if the config changed meanwhile; the access
    # log is opened after), and a stop ends the start without a traceback.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    _die_with(int(spec["master"]))
    with open(int(spec["config"]), encoding="utf-8") as f:
        text = f.read()
    path = Path(spec["path"]) if spec["path"] is not None else None
    try:
        cfg = config.loads(text, path if path is not None else config.default_config_path())
        # The address the master bound (its real port, when the file says port 0); a reload
        # keeps it, as a single server keeps `serve --listen`'s.
        server = cfg.server.model_copy(update={"listen": spec["listen"]})
        cfg = cfg.model_copy(update={"server": server})
        # Which worker trains which model: the master's decision (trainers.py).
        placement = Trainers(Path(spec["shared"]), slot, dict(spec["trainers"]))
        app = App(cfg, path, listen_from_cli=True, placement=placement)
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = spec["state"]
    shared = SharedStore(Region.attach(state, int(state["fd"])), slot, int(spec["workers"]))
    app.shared = shared
    app.metrics.sources.append(lambda: shared_families(shared))
    me = identity(slot, os.getpid())
    app.metrics.sources.append(lambda: [me])
    scrape = Scrape(app.metrics, Path(spec["shared"]), slot, int(spec["workers"]))
    app.scrape = scrape.handle
    board = Board(
        app.timeline,
        # The dashboard is made with the routes, before the first sample.
        lambda: app.dashboard.current() if app.dashboard is not None else _NO_DASHBOARD,
        Path(spec["shared"]),
        slot,
        int(spec["workers"]),
    )
    if spec["socket"] is not None:
        app.listen_socket = socket.socket(fileno=int(spec["socket"]))
    else:
        app.reuse_port = True
    beats = int(spec["beats"])
    interval = beat_interval(cfg.server.master.heartbeat_timeout)
    heartbeat: list[Heartbeat] = []

    def ready(server: HttpServer) -> None:
        loop = asyncio.get_running_loop()
        heartbeat.append(Heartbeat(beats, loop, interval))
        heartbeat[0].start()
        scrape.start(loop)
        if app.dashboard is not None:
            app.dashboard.merged = board.body  # the whole server's, as /metrics

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(_serve(app, ready))
        except (ConfigError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ConfigError) else 1
    return 0


async def _serve(app: App, ready: Callable[[HttpServer], None]) -> None:
    await app.run(ready)
    # Drained. A stop often comes twice: from the master and from whoever signals the whole
    # group (systemd's KillMode=control-group, `kill -TERM -PGID`, Ctrl-C), and once the loop
    # stops, the loop's handlers give way to the default action, which ends the process with
    # "killed by SIGTERM" instead of 0. Ignored from here on (set while the loop still runs,
    # the loop leaves it so).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())

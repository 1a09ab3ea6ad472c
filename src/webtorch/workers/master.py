"""The master process of ``server.workers > 1``: the I/O shell around :class:`Supervisor`.

It opens the port, starts the workers (``python -m webtorch.workers.worker``, each a fresh
interpreter), watches them and forwards signals; it serves nothing itself and never loads a model
or torch (its imports are the config's and the standard library's: tests/workers/ pins it), so a
user's model code can never take it down.

Per worker it makes two descriptors the worker inherits: the config text it validated (a memfd:
the worker starts from exactly what the master checked, even if the file changed since), and a
pipe the worker writes to: ``R`` once it serves, then ``.`` every tick of its event loop (the
heartbeat). The worker dies with the master: PR_SET_PDEATHSIG, and a heartbeat write that finds
the pipe's reader gone (worker.py).

One loop, one thread: ``select`` on the heartbeat pipes and on the signal wakeup descriptor
(``signal.set_wakeup_fd``: a signal's number arrives there as a byte, so handlers do nothing and
every signal is handled in the loop, in order), with the supervisor's next deadline as timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from webtorch import __version__, config
from webtorch.errors import ConfigError
from webtorch.shared.memory import Region
from webtorch.workers.supervisor import Announce, Exit, Signal, Spawn, Supervisor, Timing

log = logging.getLogger("webtorch.workers")

# The environment variable that hands a worker its descriptors and settings (worker.py reads it).
SPEC = "WEBTORCH_WORKER"
# The master's own metrics, beside the workers' in the shared directory (scrape.py adds them).
MASTER_METRICS = "master.prom"
_READ = 4096
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    beats: int  # the read end of its heartbeat pipe


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_port(listen: str, mode: str) -> socket.socket:
    """The port the workers share. "shared": a listening socket they all accept from.
    "reuseport": a socket bound with SO_REUSEPORT and not listening, which only holds the port
    (and finds it, for port 0) while each worker listens on a socket of its own beside it; a
    bound socket that does not listen is given no connections."""
    host, port = config.parse_listen(listen)
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mode == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if mode == "shared":
            sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return sock


class Master:
    def __init__(
        self,
        cfg: config.Config,
        text: str,
        path: Path | None,
        *,
        listen_from_cli: bool,
        log_level: str = "INFO",
    ) -> None:
        self.config = cfg
        self.text = text  # what cfg was read from: handed to every worker started
        self.path = path  # None: the embedded default (reload refused, as by a single server)
        self.listen_from_cli = listen_from_cli
        self.log_level = log_level
        server = cfg.server
        master = server.master
        self.supervisor = Supervisor(
            server.worker_count,
            Timing(
                heartbeat_timeout=master.heartbeat_timeout,
                start_timeout=master.start_timeout,
                restart_delay=master.restart_delay,
                restart_delay_max=master.restart_delay_max,
                stable_after=master.stable_after,
                drain_timeout=server.limits.drain_timeout,
                stop_timeout=master.stop_timeout,
            ),
        )
        self.mode = master.listen_socket
        # Each trained model's one trainer worker, fixed for the master's life: a worker
        # started again in a slot trains what the slot trains (serve/trainers.py).
        self.trainers = assign(
            [name for name, mc in cfg.models.items() if mc.train.enabled], server.worker_count
        )
        self.sock: socket.socket | None = None
        self.address = ("", 0)
        self.workers: dict[int, _Worker] = {}  # by pid
        # Where workers publish their metrics for each other (scrape.py): memory, private.
        self.shared: Path | None = None
        # The state they share (webtorch.shared): buckets, bans, surges, upstream marks.
        self.region: Region | None = None
        self._selector = selectors.DefaultSelector()

    # -- the loop

    def run(self) -> int:
        """Serve until stopped; the exit status (0: every worker drained and exited 0)."""
        self.sock = sock = open_port(self.config.server.listen, self.mode)
        memory = Path("/dev/shm")
        self.shared = Path(
            tempfile.mkdtemp(prefix="webtorch-", dir=memory if memory.is_dir() else None)
        )
        self.address = sock.getsockname()[:2]
        guard = self.config.guard
        # Sized once: [guard] is not reloadable (see _reload). Without a guard only the
        # upstream marks are used, and the bucket and ban tables take their least.
        self.region = Region.create(guard.max_clients if guard is not None else 0)
        self._publish()
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous = {sig: signal.signal(sig, _nothing) for sig in _FORWARDED}
        old_fd = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        self._selector.register(wake_read, selectors.EVENT_READ, None)
        try:
            code = self._loop(wake_read)
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()  # only after an error in the loop is any left
            self._selector.close()
            wake_read.close()
            wake_write.close()
            sock.close()
            shutil.rmtree(self.shared, ignore_errors=True)
            self.region.destroy()
        return code

    def _loop(self, wake: socket.socket) -> int:
        supervisor = self.supervisor
        self._act(supervisor.start(time.monotonic()))
        while supervisor.exit_code is None:
            deadline = supervisor.deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = self._selector.select(timeout)
            now = time.monotonic()
            for key, _ in events:
                if key.data is None:
                    self._signals(wake, now)
                else:
                    self._beats(key.data, now)
            self._reap(now)
            self._act(supervisor.tick(now))
        return supervisor.exit_code

    def _signals(self, wake: socket.socket, now: float) -> None:
        try:
            numbers = wake.recv(_READ)
        except BlockingIOError:
            return
        for number in numbers:
            if number in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(number).name
                log.info("%s: draining %d worker(s)", name, len(self.supervisor.live()))
                self._act(self.supervisor.stop(now))
            elif number == signal.SIGHUP:
                self._reload()
            elif number == signal.SIGUSR1:
                self._act(self.supervisor.forward(signal.SIGUSR1))
            # SIGCHLD: the reap after every wake-up looks at every worker

    def _beats(self, worker: _Worker, now: float) -> None:
        try:
            data = os.read(worker.beats, _READ)
        except BlockingIOError:
            return
        if not data:  # the worker closed it (exited): reaped below
            self._selector.unregister(worker.beats)
            return
        if b"R" in data:
            self._act(self.supervisor.ready(worker.proc.pid, now))
        self.supervisor.beat(worker.proc.pid, now)

    def _reap(self, now: float) -> None:
        for pid, worker in list(self.workers.items()):
            status = worker.proc.poll()
            if status is None:
                continue
            del self.workers[pid]
            if worker.beats in self._selector.get_map():
                self._selector.unregister(worker.beats)
            os.close(worker.beats)
            restarts = self.supervisor.restarts
            self._act(self.supervisor.exited(pid, status, now))
            if self.supervisor.restarts != restarts:
                self._publish()

    def _act(self, actions: list[Spawn | Signal | Announce | Exit]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(action.slot)
            elif isinstance(action, Signal):
                with contextlib.suppress(ProcessLookupError):  # exited: the reap will tell
                    os.kill(action.pid, action.signal)
            elif isinstance(action, Announce):
                self._announce(action)
            # Exit: the loop ends on supervisor.exit_code

    # -- workers

    def _spawn(self, slot: int) -> None:
        assert self.sock is not None and self.region is not None and self.region.fd is not None
        config_fd = os.memfd_create("webtorch-config")  # pass_fds hands it to the worker alone
        beats, beat_write = os.pipe()
        os.set_blocking(beats, False)
        try:
            os.write(config_fd, self.text.encode())
            os.lseek(config_fd, 0, os.SEEK_SET)
            spec = {
                "slot": slot,
                "master": os.getpid(),
                "config": config_fd,
                "path": str(self.path) if self.path is not None else None,
                "listen": listen_address(*self.address),
                "listen_from_cli": self.listen_from_cli,
                "socket": self.sock.fileno() if self.mode == "shared" else None,
                "beats": beat_write,
                "log_level": self.log_level,
                "shared": str(self.shared),
                "workers": len(self.supervisor.slots),
                "state": {**self.region.spec(), "fd": self.region.fd},
                "trainers": self.trainers,
            }
            passed = [config_fd, beat_write, self.region.fd] + (
                [self.sock.fileno()] if self.mode == "shared" else []
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "webtorch.workers.worker"],
                stdin=subprocess.DEVNULL,
                pass_fds=passed,
                env={**os.environ, SPEC: json.dumps(spec)},
            )
        except BaseException:
            os.close(beats)
            raise
        finally:
            os.close(config_fd)
            os.close(beat_write)  # the worker holds it: EOF here once it exits
        self.workers[proc.pid] = worker = _Worker(slot, proc, beats)
        self._selector.register(beats, selectors.EVENT_READ, worker)
        self.supervisor.spawned(slot, proc.pid, time.monotonic())
        log.info("worker %d: starting, pid %d", slot, proc.pid)

    def _announce(self, action: Announce) -> None:
        if action.replaced is not None:
            print(f"worker {action.replaced}: pid {action.pids[0]} (restarted)", flush=True)
            return
        scheme = "https" if self.config.server.tls else "http"
        host, port = self.address
        models = ", ".join(self.config.models) or "no models"
        print(
            f"webtorch {__version__} listening on {scheme}://{listen_address(host, port)} "
            f"({models}) with {len(action.pids)} workers",
            flush=True,
        )
        for slot, pid in enumerate(action.pids):
            trains = [name for name, trainer in self.trainers.items() if trainer == slot]
            also = f" (trains {', '.join(trains)})" if trains else ""
            print(f"worker {slot}: pid {pid}{also}", flush=True)

    def _reload(self) -> None:
        """SIGHUP: the file is validated here, once, as a single server validates it; only a
        config that every worker would apply is sent to them (they re-read the same file)."""
        if self.path is None:
            log.error("reload refused: no config file to reload (serving the embedded default)")
            return
        cfg = self.config
        try:
            text = config.read(self.path)
            new, changed = config.reloaded(
                cfg,
                config.loads(text, self.path),
                self.path,
                models=self.config.models,
                keep_listen=self.listen_from_cli,
            )
            # A reload leaves models and the guard as they are (one server's rule), but a worker
            # started after it would load the file's: refused, so that all serve the same.
            kept = [key for key in ("models", "guard") if getattr(new, key) != getattr(cfg, key)]
            if kept:
                raise config.RestartRequired(
                    f"{self.path}: [{'], ['.join(kept)}] changed, which a reload does not apply "
                    "and a worker started later would; nothing was reloaded (restart to change "
                    "them)"
                )
        except (ConfigError, OSError) as exc:
            log.error("reload failed, every worker keeps the previous config: %s", exc)
            return
        actions = self.supervisor.reload()
        if not actions and self.supervisor.exit_code is None and not self.supervisor.live():
            log.info("reload: no worker runs now; the next to start reads it")
        self.config, self.text = new, text
        log.info(
            "reloading %s in %d worker(s)%s",
            self.path,
            len(actions),
            f"; [server] {', '.join(changed)} changed" if changed else "",
        )
        self._act(actions)

    def _publish(self) -> None:
        """The restarts so far, as exposition text the workers' /metrics include."""
        assert self.shared is not None
        lines = [
            "# HELP webtorch_worker_restarts_total Workers started again after one ended, by "
            "cause: exited (died), stuck (no heartbeat), start_timeout",
            "# TYPE webtorch_worker_restarts_total counter",
            *(
                f'webtorch_worker_restarts_total{{cause="{cause}"}} {float(count)}'
                for cause, count in self.supervisor.restarts_by.items()
            ),
        ]
        target = self.shared / MASTER_METRICS
        temporary = target.with_suffix(".tmp")
        try:
            temporary.write_text("\n".join(lines) + "\n")
            os.replace(temporary, target)
        except OSError as exc:
            log.warning("cannot publish the master's metrics to %s: %s", target, exc)

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


def assign(trained: list[str], workers: int) -> dict[str, int]:
    """One trainer worker per trained model, round robin in the config's order: the models
    spread over the workers, and one config always gives one placement."""
    return {name: i % workers for i, name in enumerate(trained)}


def _nothing(signum: int, frame: object) -> None:
    """A handler that lets the signal through to the wakeup descriptor (and select)."""


def serve(
    cfg: config.Config,
    text: str,
    path: Path | None,
    *,
    listen_from_cli: bool,
    log_level: str,
) -> int:
    master = Master(cfg, text, path, listen_from_cli=listen_from_cli, log_level=log_level)
    code = master.run()
    print("webtorch stopped", flush=True)
    return code

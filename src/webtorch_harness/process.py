"""A child process with a log file, its session's CPU, waits against deadlines, and a stop that
always collects its log; :func:`serve` starts ``webtorch serve`` and finds its port.

CPU times come from /proc/PID/stat (utime and stime, every thread of a process): psutil is not
a dependency, and the harness runs where the server does (Linux).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

STOP_TIMEOUT = 10.0  # seconds a child gets to exit on its stop signal before SIGKILL
READY_TIMEOUT = 90.0  # importing torch on a busy two-core machine can take most of a minute
LOG_POLL = 0.02  # seconds between two reads of a log file while waiting for a line
HTTP_POLL = 0.05  # seconds between two requests while waiting for an answer
HTTP_TIMEOUT = 5.0  # seconds one readiness request may take
LOG_LIMIT = 4 << 20  # bytes of a log that stop() returns: its end (a benchmark's log can be big)
TAIL_LINES = 20  # lines of a log quoted in an error
# What `webtorch serve` prints once it listens (webtorch/cli.py), one line per address.
LISTEN = re.compile(r"listening on (https?)://(\S+):(\d+)")

T = TypeVar("T")


class HarnessError(Exception):
    """A child did not start, get ready or answer as asked; the message says why and quotes the
    end of its log."""


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far, summed over ``processes`` processes."""

    user: float
    system: float
    processes: int

    @property
    def total(self) -> float:
        return self.user + self.system


@dataclass(frozen=True)
class Stopped:
    """How a child ended: its exit status (negative: the signal that ended it), its log (the
    last ``LOG_LIMIT`` bytes), and whether it had to be killed after its stop signal's timeout."""

    returncode: int
    log: str
    killed: bool


# -- /proc ----------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "pid (comm)": state ppid pgrp session ... utime (11)
    stime (12); None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def cpu_times(pids: Iterable[int]) -> CpuTimes:
    """User and system CPU seconds of ``pids``, all their threads; processes gone count 0."""
    user = system = count = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
            count += 1
    ticks = os.sysconf("SC_CLK_TCK")
    return CpuTimes(user / ticks, system / ticks, count)


def session_pids(sid: int) -> list[int]:
    """Every process in session ``sid``: a server and every worker it forked or spawned."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a child that cannot report the one it got for port 0 (nginx)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_session(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> bool:
    """Send ``sig`` to the session of ``proc`` (started with ``start_new_session``: it leads a
    process group of its own id), give it ``timeout`` seconds to exit, then SIGKILL what is left
    of the group, workers it left behind included. True if SIGKILL ended ``proc`` itself."""
    deadline = time.monotonic() + timeout
    killed = False
    if proc.poll() is None:
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Workers the child left behind (its exit does not end them) get the rest of the time.
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(LOG_POLL)
    _signal_group(proc.pid, signal.SIGKILL)
    return killed


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _read_tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# -- a child ----------------------------------------------------------------------------------


class Process:
    """A child in a session of its own (so that its workers are signalled and counted with it),
    stdout and stderr to ``log_path``; use :func:`start` (or :func:`serve`) to make one."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        name: str | None = None,
        owned: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.log_path = log
        self.host = host
        self.port = port
        self.scheme = "http"
        self._owned = owned  # a scratch directory this handle made and removes on close
        self._stopped: Stopped | None = None
        try:
            with log.open("wb") as out:  # the child holds its own descriptor from here on
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    start_new_session=True,
                )
        except OSError as exc:
            self._remove_owned()
            raise HarnessError(f"cannot start {self.name}: {exc}") from None

    # -- state

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def url(self) -> str:
        if self.port is None:
            raise HarnessError(f"{self.name}: no port known")
        return f"{self.scheme}://{self.host}:{self.port}"

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds for the child to exit; its status, None if it runs."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._proc.wait(timeout)
        return None

    def send(self, sig: int) -> None:
        """Send ``sig`` to the child itself (not its workers), if it still runs."""
        if self._proc.poll() is None:
            self._proc.send_signal(sig)

    def pids(self) -> list[int]:
        """The child's session: the child and every process it started."""
        return session_pids(self.pid) if self._proc.poll() is None else []

    def cpu_times(self, session: bool = True) -> CpuTimes:
        """CPU used so far by the child's session (``session=False``: the child alone)."""
        return cpu_times(self.pids() if session else [self.pid])

    # -- the log

    def log_size(self) -> int:
        """The log's length now: pass it to :meth:`wait_log` to wait for a line after this."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, limit: int = LOG_LIMIT) -> str:
        """The log so far (its last ``limit`` bytes)."""
        return _read_tail(self.log_path, limit)

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.log_text(64 << 10).splitlines()[-lines:]) or "(empty log)"

    # -- waits

    def wait_for(
        self, check: Callable[[], T | None], what: str, timeout: float, poll: float = HTTP_POLL
    ) -> T:
        """Call ``check`` until it returns something other than None, and return that. Between
        two calls the wait is on the child, so it ends at once if the child exits (an error,
        as is the deadline passing); an exception from ``check`` ends it too."""
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found is not None:
                return found
            status = self._proc.poll()
            if status is not None:
                raise HarnessError(
                    f"{self.name} exited with status {status} before {what}; "
                    f"its log ends:\n{self.log_tail()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(
                    f"{self.name}: not {what} within {timeout:g} s; its log ends:\n"
                    f"{self.log_tail()}"
                )
            self.wait(min(poll, left))

    def wait_log(
        self, pattern: str | re.Pattern[str], timeout: float = READY_TIMEOUT, after: int = 0
    ) -> re.Match[str]:
        """The first match of ``pattern`` in the log from byte ``after`` on, once it is there."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = bytearray()

        def check() -> re.Match[str] | None:
            try:
                with self.log_path.open("rb") as f:
                    f.seek(after + len(seen))
                    seen.extend(f.read())
            except OSError:
                return None
            return regex.search(seen.decode(errors="replace"))

        return self.wait_for(check, f"logging {regex.pattern!r}", timeout, LOG_POLL)

    def wait_http(
        self,
        target: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = READY_TIMEOUT,
        ready: Callable[[int, bytes], bool] | None = None,
    ) -> tuple[int, bytes]:
        """Ask ``target`` (a path on :attr:`url`, or a whole URL) until ``ready(status, body)``
        (default: status 200); return that answer. A refused connection or another status is
        asked again; ``ready`` may raise to give up at once (an answer that waiting cannot fix)."""
        url = target if "://" in target else self.url + target
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or self.host, parts.port or 80
        connection = _connection(parts.scheme)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        accept = ready if ready is not None else (lambda status, _: status == 200)
        last = ["no answer"]

        def check() -> tuple[int, bytes] | None:
            conn = connection(host, port)
            try:
                conn.request(method, path, body=body, headers=dict(headers or {}))
                response = conn.getresponse()
                answer = (response.status, response.read())
            except (OSError, http.client.HTTPException) as exc:
                last[0] = str(exc) or type(exc).__name__
                return None
            finally:
                conn.close()
            if accept(*answer):
                return answer
            last[0] = f"status {answer[0]}: {answer[1][:200]!r}"
            return None

        try:
            return self.wait_for(check, f"answering {method} {url}", timeout)
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n(last answer: {last[0]})") from None

    # -- the end

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> Stopped:
        """Send ``sig`` to the child's session, give it ``timeout`` seconds to exit, then
        SIGKILL what is left of it; its status and log. Calling it again returns the same."""
        if self._stopped is not None:
            return self._stopped
        killed = stop_session(self._proc, sig, timeout)
        self._stopped = Stopped(self._proc.returncode, self.log_text(), killed)
        return self._stopped

    def close(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """:meth:`stop` (if not done yet), and remove the scratch directory this handle made."""
        try:
            self.stop(sig, timeout)
        finally:
            self._remove_owned()

    def __enter__(self: _P) -> _P:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _remove_owned(self) -> None:
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)
            self._owned = None


_P = TypeVar("_P", bound=Process)


def _connection(scheme: str) -> Callable[[str, int], http.client.HTTPConnection]:
    if scheme != "https":
        return lambda host, port: http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT)
    import ssl

    # A test server's certificate is its own: readiness is about answering, not about trust.
    context = ssl._create_unverified_context()
    return lambda host, port: http.client.HTTPSConnection(
        host, port, timeout=HTTP_TIMEOUT, context=context
    )


class Server(Process):
    """``webtorch serve`` as a child (see :func:`serve`): ready, with its port known."""

    config_path: Path | None = None
    workdir: Path


def _pinned(argv: Sequence[str], cpus: str | int | None) -> list[str]:
    return ["taskset", "-c", str(cpus), *argv] if cpus is not None else list(argv)


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # Unbuffered: a Python child's lines reach its log as they are printed, not at exit.
    return {**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}


def start(
    argv: Sequence[str],
    *,
    log: Path | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    cpus: str | int | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    name: str | None = None,
) -> Process:
    """Start ``argv`` (on CPUs ``cpus`` with taskset, when given), its output to ``log`` (a
    scratch directory's file, removed on close, when not given); ``env`` adds to this process's
    environment; ``port``: where it will listen, for :attr:`Process.url`. It is not waited on:
    use :meth:`Process.wait_http` or :meth:`Process.wait_log` for the readiness it has."""
    owned = None
    if log is None:
        owned = Path(tempfile.mkdtemp(prefix="webtorch-harness-"))
        log = owned / "output.log"
    return Process(
        _pinned(argv, cpus),
        log=log,
        cwd=cwd,
        env=_env(env),
        port=port,
        host=host,
        name=name or Path(argv[0]).name,
        owned=owned,
    )


def serve(
    config: Path | None = None,
    *extra: str,
    toml: str | None = None,
    workdir: Path | None = None,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cpus: str | int | None = None,
    listen: str | None = "127.0.0.1:0",
    command: Sequence[str] | None = None,
    ready_path: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> Server:
    """``webtorch serve`` with ``config`` (a file) or ``toml`` (a config's text, written into
    the working directory), ``--listen listen`` (any free port by default; None: the config's)
    and ``extra`` arguments; returned once it has printed the address it listens on, and, with
    ``ready_path`` (e.g. ``/v2/health/ready``), once that answers 200.

    It runs in ``workdir`` (a scratch directory, removed on close, when not given: the embedded
    default keeps its training state under the working directory), its output in ``log``
    (``workdir/server.log`` by default). ``command`` replaces ``python -m webtorch.cli``. If it
    exits or is not ready within ``timeout`` seconds it is stopped and :class:`HarnessError`
    says why, with the end of its log."""
    if config is not None and toml is not None:
        raise ValueError("give a config file or a config's text, not both")
    owned = None
    if workdir is None:
        workdir = owned = Path(tempfile.mkdtemp(prefix="webtorch-serve-"))
    if toml is not None:
        config = workdir / "webtorch.toml"
        config.write_text(toml)
    argv = [*(command or [sys.executable, "-m", "webtorch.cli"]), "serve"]
    if config is not None:
        argv.append(str(config))
    if listen is not None:
        argv += ["--listen", listen]
    server = Server(
        _pinned([*argv, *extra], cpus),
        log=log if log is not None else workdir / "server.log",
        cwd=workdir,
        env=_env(env),
        name="webtorch serve",
        owned=owned,
    )
    server.config_path, server.workdir = config, workdir
    try:
        started = time.monotonic()
        found = server.wait_log(LISTEN, timeout)
        server.scheme, server.host, server.port = found[1], found[2], int(found[3])
        if ready_path is not None:
            server.wait_http(ready_path, timeout=max(0.0, timeout - (time.monotonic() - started)))
    except BaseException:
        server.close()
        raise
    return server

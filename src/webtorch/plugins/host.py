"""The running set of plugins: loaded from the config, started (startup, periodic work), swapped
by a reload (the new set loads and starts before it replaces the old, which a failure keeps)
and shut down. The request path reads the set through :class:`Runner`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from webtorch.config.plugins import PluginConfig
from webtorch.errors import ConfigError
from webtorch.http.messages import Handler
from webtorch.http.state import AccessLogger, ConnectionGate, ServerState
from webtorch.plugins.calls import Refused, failed, run_quiet
from webtorch.plugins.context import Host, ModelSource
from webtorch.plugins.loader import Loaded, from_object, load
from webtorch.plugins.runner import Runner
from webtorch.plugins.table import Plugin, PluginSet, StatsStore
from webtorch.proxy.upstream import UpstreamGroup

log: Final = logging.getLogger("webtorch.plugins")


def load_set(
    configs: Sequence[PluginConfig],
    base_dir: Path,
    store: StatsStore,
    first: Sequence[Loaded] = (),
) -> PluginSet:
    """Every configured plugin loaded (ConfigError naming the first that fails), after the
    server's own (``first``), whose names a configured plugin may not take."""
    loaded: list[Loaded] = [load(config, base_dir) for config in configs]
    _check_names(loaded, first)
    return PluginSet(loaded, store, first)


def _check_names(loaded: Sequence[Loaded], first: Sequence[Loaded]) -> None:
    """A configured plugin's name is not one of the server's own (their metrics would mix)."""
    taken = {own.name for own in first}
    for plugin in loaded:
        if plugin.name in taken:
            raise ConfigError(
                f"plugins.{plugin.name}: {plugin.path}: the name {plugin.name!r} is the "
                "server's own plugin's (give this one another `name`)"
            )


class PluginHost:
    """The plugins of the running config, and their life: start, periodic work, reload, stop."""

    def __init__(
        self, configs: Sequence[PluginConfig], base_dir: Path, models: ModelSource
    ) -> None:
        self.store: StatsStore = {}
        self.models = models
        self.runner = Runner(load_set(configs, base_dir, self.store), models)
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called after a reload swapped the set in (the app installs its hooks again).
        self.on_change: Callable[[], None] | None = None
        self._started = False  # every startup ran: stop() owes the shutdowns

    @property
    def plugins(self) -> PluginSet:
        return self.runner.set

    def put_first(self, name: str, obj: Any, body: Literal["buffer", "stream"] = "buffer") -> None:
        """One of the server's own plugins (the guard), run before every configured one and
        kept across reloads; before :meth:`start`. ``obj`` has phase methods as a plugin
        file's ``plugin`` has; ``body`` is its request_body mode."""
        assert self._loop is None, "the server's own plugins go in before start()"
        path = Path(inspect.getfile(type(obj)))
        config = PluginConfig(path=path, name=name, on_error="open", body=body)
        first = [*self.runner.set.first, from_object(config, path, obj)]
        configured = self.runner.set.configured
        _check_names(configured, first)
        self.runner.set = PluginSet(configured, self.store, first)

    async def start(self) -> None:
        """Each plugin's startup, in order (ConfigError naming the one that fails: the server
        does not start), then its periodic work."""
        self._loop = asyncio.get_running_loop()
        problem = await self._startup(self.runner.set)
        if problem is not None:
            raise ConfigError(problem)
        self._started = True
        self._schedule(self.runner.set)

    async def _startup(self, plugins: PluginSet, begun: int = 0) -> str | None:
        """The startups of ``plugins`` from the ``begun``-th on; the problem, if one fails."""
        for plugin in plugins.plugins[begun:]:
            fn = plugin.loaded.hooks.get("startup")
            if fn is None:
                continue
            started = time.perf_counter()
            try:
                result = fn(self._host_of(plugin))
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                return self._startup_failed(plugin, exc)
            finally:
                _count(plugin, "startup", started)
        return None

    def _startup_now(self, plugins: PluginSet) -> tuple[str | None, int, Any]:
        """The startups that are plain functions, in order, up to the first that returns an
        awaitable: (problem, how many ran, that awaitable or None)."""
        for i, plugin in enumerate(plugins.plugins):
            fn = plugin.loaded.hooks.get("startup")
            if fn is None:
                continue
            started = time.perf_counter()
            try:
                result = fn(self._host_of(plugin))
            except Exception as exc:
                return self._startup_failed(plugin, exc), i, None
            finally:
                _count(plugin, "startup", started)
            if inspect.isawaitable(result):
                return None, i + 1, result
        return None, len(plugins.plugins), None

    def _host_of(self, plugin: Plugin) -> Host:
        loaded = plugin.loaded
        return Host(plugin.name, loaded.path, loaded.config.settings, self.models)

    def _startup_failed(self, plugin: Plugin, exc: Exception) -> str:
        plugin.stats["startup"].errors += 1
        log.error("plugin %s failed in startup", plugin.name, exc_info=exc)
        return f"plugins.{plugin.name}: {plugin.loaded.path}: startup failed: {exc!r}"

    def _schedule(self, plugins: PluginSet) -> None:
        loop = self._loop
        assert loop is not None
        for plugin in plugins.plugins:
            for seconds, name, fn in plugin.loaded.periodic:
                self._arm(loop, plugin, f"every:{name}", fn, seconds)

    def _arm(
        self,
        loop: asyncio.AbstractEventLoop,
        plugin: Plugin,
        phase: str,
        fn: Callable[..., Any],
        seconds: float,
    ) -> None:
        handle: list[asyncio.TimerHandle] = []

        def tick() -> None:
            self._timers.remove(handle[0])
            result = run_quiet(plugin, phase, fn, None)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(lambda t: self._periodic_done(plugin, phase, t))
            again = loop.call_later(seconds, tick)
            handle[:] = [again]
            self._timers.append(again)

        first = loop.call_later(seconds, tick)
        handle.append(first)
        self._timers.append(first)

    def _periodic_done(self, plugin: Plugin, phase: str, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            failed_quietly(plugin, phase, exc)

    def reload(self, configs: Sequence[PluginConfig], base_dir: Path) -> str:
        """Load ``configs`` and, once their startups succeeded, swap them in for the running
        set, whose shutdowns run then. A file that fails to load raises ConfigError, and so
        does a startup that is a plain function and fails: the running set stays. With only
        plain startups the new set is in place when this returns; an async one defers the swap
        until it finished (a failure then is logged, and the running set stays)."""
        # ConfigError: nothing changes
        new = load_set(configs, base_dir, self.store, self.runner.set.first)
        if self._loop is None:  # not started (tests of the set alone): swap at once
            self._swap(new)
            return f"{len(new)} plugin(s)"
        problem, begun, waiting = self._startup_now(new)
        if problem is not None:
            raise ConfigError(problem)
        if waiting is None:
            self._swap(new)
            return f"{len(new)} plugin(s)"
        task = asyncio.ensure_future(self._swap_after(new, waiting, begun))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return f"{len(new)} plugin(s), in place once their startup ran"

    async def _swap_after(self, new: PluginSet, waiting: Any, begun: int) -> None:
        try:
            await waiting
        except Exception as exc:
            problem: str | None = self._startup_failed(new.plugins[begun - 1], exc)
        else:
            problem = await self._startup(new, begun)
        if problem is not None:
            log.error("reload: %s; still running the previous plugins", problem)
            return
        self._swap(new)

    def _swap(self, new: PluginSet) -> None:
        old = self.runner.set
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self.runner.set = new
        if self._loop is not None:
            self._schedule(new)
            task = asyncio.ensure_future(self._shutdown(old))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.on_change is not None:
            self.on_change()
        log.info("plugins: %s", ", ".join(p.name for p in new.plugins) or "none")

    async def _shutdown(self, plugins: PluginSet) -> None:
        for plugin in plugins.plugins:
            fn = plugin.loaded.hooks.get("shutdown")
            if fn is None:
                continue
            started = time.perf_counter()
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                plugin.stats["shutdown"].errors += 1
                log.error("plugin %s failed in shutdown", plugin.name, exc_info=exc)
            finally:
                _count(plugin, "shutdown", started)

    async def stop(self) -> None:
        """Periodic work stops, then each plugin's shutdown (after the server drained)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._started:
            self._started = False
            await self._shutdown(self.runner.set)


def _count(plugin: Plugin, phase: str, started: float) -> None:
    stats = plugin.stats[phase]
    stats.calls += 1
    stats.seconds += time.perf_counter() - started


def failed_quietly(plugin: Plugin, phase: str, exc: BaseException) -> None:
    """Periodic work failed in its awaitable: logged and counted (open or closed alike)."""
    try:
        failed(plugin, phase, None, exc)
    except Refused:
        return


class Base:
    """The server's own hooks, which the plugins' wrap: its handler (the guard's, or the
    router), access log hook and connection gate."""

    def __init__(
        self, handler: Handler, access_log: AccessLogger | None, gate: ConnectionGate | None
    ) -> None:
        self.handler = handler
        self.access_log = access_log
        self.gate = gate


def install(
    host: PluginHost, state: ServerState, base: Base, groups: Iterable[UpstreamGroup]
) -> None:
    """The running set's hooks into the server's state and the upstream groups, for the phases
    some plugin joins; the server's own where none does (so a server without plugins runs
    exactly as it would without this package)."""
    runner = host.runner
    plugins = runner.set
    some = len(plugins) > 0
    state.handler = runner.wrap(base.handler) if some else base.handler
    state.access_log = runner.log_hook(base.access_log) if some else base.access_log
    state.gate = runner.gate(base.gate) if plugins.connect or plugins.disconnect else base.gate
    picker = runner.pick if plugins.picks else None
    for group in groups:
        group.picker = picker

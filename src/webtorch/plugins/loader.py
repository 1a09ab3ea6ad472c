"""A plugin file -> :class:`Loaded`: its module run, its ``plugin`` object's phases found and
checked. Every failure is a ConfigError naming the plugin, the file and the line, so a start-up
stops (and a reload keeps the set it had) with a message that points at the mistake."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from webtorch.config.plugins import PluginConfig
from webtorch.errors import ConfigError
from webtorch.plugins.api import ASYNC_PHASES, EVERY_ATTRIBUTE, PHASES
from webtorch.userfiles import UserFileError, import_user_file


class Loaded:
    """A plugin as loaded: its config, object, phase methods and periodic work."""

    def __init__(
        self,
        config: PluginConfig,
        path: Path,
        obj: Any,
        hooks: dict[str, Callable[..., Any]],
        waits: frozenset[str],
        periodic: list[tuple[float, str, Callable[..., Any]]],
    ) -> None:
        self.config = config
        self.name = config.label
        self.path = path
        self.obj = obj
        self.hooks = hooks  # phase -> bound method, for the phases it defines
        self.waits = waits  # the phases it defines with `async def`
        self.periodic = periodic  # (seconds, method name, method)


def load(config: PluginConfig, base_dir: Path) -> Loaded:
    """Run ``config.path`` (relative to ``base_dir``) and take its ``plugin``."""
    path = config.path if config.path.is_absolute() else base_dir / config.path
    name = config.label
    where = f"plugins.{name}: {path}"
    module = _run(path, name)
    obj = getattr(module, "plugin", None)
    if obj is None:
        raise ConfigError(f"{where}: defines no `plugin` (plugin = an object with phase methods)")
    if inspect.isclass(obj):  # `plugin = Auth`: one instance
        try:
            obj = obj()
        except Exception as exc:
            line = _line_in(exc, path)
            at = f"{where}:{line}" if line is not None else where
            raise ConfigError(f"{at}: {type(exc).__name__}: {exc}") from None
    return from_object(config, path, obj)


def from_object(config: PluginConfig, path: Path, obj: Any) -> Loaded:
    """``obj``'s phases found and checked: a plugin file's ``plugin``, or one of the server's
    own (the guard) given as an object."""
    where = f"plugins.{config.label}: {path}"
    hooks: dict[str, Callable[..., Any]] = {}
    waits: set[str] = set()
    for phase in PHASES:
        fn = getattr(obj, phase, None)
        if fn is None:
            continue
        if not callable(fn):
            raise ConfigError(f"{_at(where, fn, path)}: `{phase}` is not a method")
        if inspect.iscoroutinefunction(fn):
            if phase not in ASYNC_PHASES:
                raise ConfigError(
                    f"{_at(where, fn, path)}: `{phase}` cannot be async (only "
                    f"{', '.join(sorted(ASYNC_PHASES))} may wait); make it a plain function"
                )
            waits.add(phase)
        hooks[phase] = fn
    periodic = []
    for attr in dir(obj):
        if attr.startswith("__"):
            continue
        fn = getattr(obj, attr, None)
        seconds = getattr(fn, EVERY_ATTRIBUTE, None)
        if callable(fn) and isinstance(seconds, float):
            periodic.append((seconds, attr, fn))
        elif attr.startswith("on_") and attr[3:] in PHASES and callable(fn):
            # A common slip (mitmproxy's and others' spelling): it would silently never run.
            raise ConfigError(
                f"{_at(where, fn, path)}: `{attr}` is not a phase; name it `{attr[3:]}`"
            )
    if not hooks and not periodic:
        raise ConfigError(
            f"{where}: `plugin` joins no phase (define one of: {', '.join(PHASES)}; or every())"
        )
    return Loaded(config, path, obj, hooks, frozenset(waits), periodic)


def _run(path: Path, name: str) -> ModuleType:
    """The file run as a module (userfiles.py: its errors name the line they came from)."""
    try:
        return import_user_file(path, "plugin")
    except UserFileError as exc:
        raise ConfigError(f"plugins.{name}: {exc}") from None


def _line_in(exc: BaseException, path: Path) -> int | None:
    """The last line of ``path`` in the exception's traceback (the plugin's own)."""
    found = None
    target = str(path)
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == target:
            found = frame.lineno
    return found


def _at(where: str, fn: Any, path: Path) -> str:
    """``where`` with the line ``fn`` is defined at, when it is defined in the plugin file."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is not None and code.co_filename == str(path):
        return f"{where}:{code.co_firstlineno}"
    return where

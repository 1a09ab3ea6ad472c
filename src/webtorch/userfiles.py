"""Running the Python files users name in config: model files, pipeline files, plugins.

One loader so that every such file fails the same way: a message naming the file and, where its
code raised, the line in it (the user's own frame, not WebTorch's). A low-level module (the
standard library only), so that serve/, pipeline/ and any later user-code loader share it.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType


class UserFileError(Exception):
    """A user's file is missing, does not import, or lacks what it must define."""


def _where(path: Path, exc: BaseException) -> str:
    """``path:line`` of the deepest frame of ``exc``'s traceback inside ``path`` (a syntax
    error carries its own line), or just the path."""
    line: int | None = None
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        line = exc.lineno
    else:
        resolved = str(path.resolve())
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename == resolved or frame.filename == str(path):
                line = frame.lineno
    return f"{path}:{line}" if line is not None else str(path)


def import_user_file(path: Path, kind: str) -> ModuleType:
    """Execute ``path`` as a fresh module (its name derived from the resolved path, so two files
    of one name do not collide) and return it. ``kind`` ("model file", "plugin", ...) starts
    every error message."""
    if not path.is_file():
        raise UserFileError(f"{kind} {path} does not exist")
    key = str(path.resolve())
    module_name = f"webtorch_user_{kind.replace(' ', '_')}_{abs(hash(key))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserFileError(f"cannot import {kind} {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise UserFileError(f"{kind} {_where(path, exc)} failed to import: {exc!r}") from exc
    return module

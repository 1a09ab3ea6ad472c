"""Files that hold what others must not read: training data (the WAL, checkpoints), the guard's
feedback-tuned weights, the learned balancing policy's state. Created owner-only (files 0600,
directories 0700) whatever the umask, written whole or not at all.

A low-level module (the standard library only), so that train/, guard/, balance/ and observe/
share it without importing each other.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

PRIVATE_FILE: Final = 0o600
PRIVATE_DIR: Final = 0o700


def fsync_directory(directory: Path) -> None:
    """Make creations, renames and deletions in ``directory`` durable (POSIX needs this apart)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(directory: Path, mode: int = PRIVATE_DIR) -> None:
    """Create ``directory`` and its missing parents with ``mode`` (default 0700: the owner's).

    ``Path.mkdir(parents=True)`` would create the parents 0777 minus the umask. Directories that
    exist already are left as they are (the operator chose them)."""
    missing: list[Path] = []
    path = directory
    while not path.exists():
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # created meanwhile by someone else: theirs, left as it is
        os.chmod(path, mode)  # the umask may have taken bits away (never adds them)


def write_private(
    path: Path,
    write: Callable[[Path], None],
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> None:
    """Write ``path`` through ``write`` (given a temporary path beside it) owner-only and
    atomically: the temporary file is created 0600 (mkstemp), synced, and renamed over ``path``,
    so a crash leaves the previous file or the new one, never a torn one, and no reader sees
    the data with other modes meanwhile. Missing directories are created 0700. ``prefix`` and
    ``suffix`` name the temporary file (for a reader that cleans up what a crash left)."""
    directory = path.parent
    make_private_dir(directory)
    start = prefix if prefix is not None else f".{path.name}."
    fd, name = tempfile.mkstemp(dir=directory, prefix=start, suffix=suffix)
    os.close(fd)
    temp = Path(name)
    try:
        write(temp)  # safetensors' save_file replaces the file's contents, keeping its mode
        os.chmod(temp, PRIVATE_FILE)  # in case the writer made a new file
        with temp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def truncate_durably(path: Path, size: int) -> None:
    """Cut ``path`` to ``size`` bytes and fsync it (by path: the caller's descriptor may be the
    one that failed)."""
    os.truncate(path, size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

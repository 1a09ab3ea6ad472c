"""What the test plugins saw, shared between the server's thread and the test's: plugin files
import this module and append; tests wait on the condition (never on a sleep)."""

from __future__ import annotations

import threading
from typing import Any

EVENTS: list[Any] = []
_changed = threading.Condition()


def note(event: Any) -> None:
    with _changed:
        EVENTS.append(event)
        _changed.notify_all()


def clear() -> None:
    with _changed:
        EVENTS.clear()


def wait_for(predicate: Any, timeout: float = 10.0) -> list[Any]:
    """The events once ``predicate(events)`` holds (AssertionError after ``timeout``)."""
    with _changed:
        if not _changed.wait_for(lambda: predicate(EVENTS), timeout):
            raise AssertionError(f"not seen in {timeout}s; events: {EVENTS}")
        return list(EVENTS)

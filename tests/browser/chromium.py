"""Which Chromium to drive and how to launch it: shared by the browser tests (conftest.py) and
benchmarks/dashboard_screenshot.py."""

from __future__ import annotations

import os
import shutil

# Flags from the machine notes: a sandbox needs a non-root user, there is no GPU, and Chromium's
# background connections to Google's hosts only fail (many at a time) on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """WEBTORCH_CHROMIUM, else Debian's chromium on PATH, else /usr/bin/chromium."""
    configured = os.environ.get("WEBTORCH_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None

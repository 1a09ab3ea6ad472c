"""A real browser for the dashboard's tests: Debian's Chromium, driven by Playwright.

Playwright comes from PyPI (the dev extra); its own browser download (``playwright install``) is
never used: these machines cannot reach it, and CI installs Debian's ``chromium`` instead
(scripts/setup). Without Chromium the tests fail and say how to get it; ``WEBTORCH_SKIP_BROWSER=1``
skips them instead, for machines that cannot install it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.chromium import CHROMIUM_ARGS, chromium_path

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ROOT = Path(__file__).resolve().parent.parent.parent


def artifacts_dir() -> Path:
    """Where screenshots go: WEBTORCH_ARTIFACTS, else test-artifacts/ (git-ignored)."""
    path = Path(os.environ.get("WEBTORCH_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Module scope, not session: while Playwright's sync API is open, an asyncio loop counts as
# running in this thread, and the later tests that run loops of their own would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if os.environ.get("WEBTORCH_SKIP_BROWSER") == "1":
        pytest.skip("WEBTORCH_SKIP_BROWSER=1: browser tests skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the browser tests need playwright (pip install -e '.[dev]'); "
            "set WEBTORCH_SKIP_BROWSER=1 to skip them",
            pytrace=False,
        )
    executable = chromium_path()
    if executable is None:
        pytest.fail(
            "the browser tests need Debian's Chromium (apt-get install chromium; scripts/setup "
            "installs it when run as root), or WEBTORCH_CHROMIUM=/path/to/chromium; set "
            "WEBTORCH_SKIP_BROWSER=1 to skip them",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    return artifacts_dir()

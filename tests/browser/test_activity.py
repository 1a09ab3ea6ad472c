"""The activity example's page in a real browser: headless Chromium opens page.html (a file,
as a user would), which plays a simulated phone over a WebSocket to a real ``webtorch serve``
of the example model and shows its answers; the page must show predictions, most of them
right, with the probabilities drawn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import artifacts_dir
from tests.conftest import ROOT, serve_process
from webtorch_harness import Server

if TYPE_CHECKING:
    from playwright.sync_api import Browser

EXAMPLE = ROOT / "src" / "webtorch" / "examples" / "activity"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("activity")
    config = tmp / "activity.toml"
    config.write_text(
        f'[models.activity]\npath = "{EXAMPLE / "activity.py"}"\n\n[streams]\n',
        encoding="utf-8",
    )
    with serve_process(config) as server:
        yield server


def test_the_page_streams_one_phone_and_shows_the_answers(browser: Browser, served: Server) -> None:
    page = browser.new_page()
    try:
        url = (EXAMPLE / "page.html").as_uri() + f"?server=127.0.0.1:{served.port}"
        page.goto(url)
        # 8 s of sitting, then walking: wait for answers past the first change of activity.
        page.wait_for_function("window.activityState.answers >= 50", timeout=40_000)
        state = page.evaluate("window.activityState")
        assert state["error"] is None and len(state["stream"]) == 32
        assert state["right"] >= 0.8 * state["answers"], state
        assert page.text_content("#predicted") in ("sitting", "walking", "stairs", "running")
        widths = page.eval_on_selector_all(".bar", "bars => bars.map(b => b.style.width)")
        assert any(w not in ("0", "0px") for w in widths)
        page.screenshot(path=str(artifacts_dir() / "activity.png"))
    finally:
        page.close()

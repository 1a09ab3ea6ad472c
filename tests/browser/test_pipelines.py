"""The dashboard's pipeline view in a real browser: a pipeline under load shows its stages as
boxes in order, with live times per stage and where the time goes."""

from __future__ import annotations

import http.client
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tests.conftest import serve_in_thread
from tests.pipeline.test_server import TEXT
from webtorch import config as wt_config

if TYPE_CHECKING:
    from playwright.sync_api import Browser

LIVE_TIMEOUT_MS = 20_000


def test_pipeline_stages_are_boxes_with_live_times(browser: Browser, artifacts: Path) -> None:
    cfg = wt_config.from_dict(
        {"pipelines": {"text": {"path": str(TEXT), "stages": {"measure": {"placement": "thread"}}}}}
    )
    with serve_in_thread(cfg) as running:
        stop = threading.Event()

        def load() -> None:
            conn = http.client.HTTPConnection(running.host, running.port, timeout=30)
            while not stop.is_set():
                conn.request(
                    "POST",
                    "/pipelines/text/predict",
                    b'["some text to clean", "and more"]',
                    {"Content-Type": "application/json"},
                )
                conn.getresponse().read()
            conn.close()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        try:
            page.goto(f"{running.url}/dashboard")
            # Two polls under load: the boxes then show this second's mean time per stage.
            page.wait_for_function(
                """() => {
                  const ms = document.querySelector(
                    '[data-pipeline="text"] [data-stage="score"] [data-stat="ms"]');
                  return ms && /^[0-9]/.test(ms.textContent);
                }""",
                timeout=LIVE_TIMEOUT_MS,
            )
            stages = page.eval_on_selector_all(
                '[data-pipeline="text"] .stage', "nodes => nodes.map(n => n.dataset.stage)"
            )
            assert stages == ["clean", "measure", "score"]
            legend = page.text_content('[data-pipeline="text"] .time-legend') or ""
            assert legend.startswith("where the time goes: clean ")
            assert page.get_attribute("body", "data-render-error") is None
            page.locator("#panel-pipelines").screenshot(path=str(artifacts / "pipelines.png"))
        finally:
            stop.set()
            loader.join(30)
            page.close()

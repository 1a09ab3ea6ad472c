"""The live dashboard in a real browser, against a real ``webtorch serve`` under load.

One server serves XOR (training on) and proxies ``/api/`` to two real upstreams with the learned
policy, while background threads train, predict and send proxied requests. Headless Chromium
opens ``/dashboard`` and the tests read the page: live state, charts drawn with data, numbers that
move, the loss, the upstream table; then the server is killed and the page must say so. A
screenshot of each state goes to the artifacts directory (see conftest.py).
"""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import XOR, serve_process
from tests.proxy.upstreams import TestUpstream, upstreams
from webtorch_harness import Server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Route

TOKEN = "dashboard-test-token-0123456789"
LIVE_TIMEOUT_MS = 20_000  # a busy two-core machine: the server's first samples, the first load

# Counts the pixels of a chart's canvas close to one colour: a series line drawn in it (axes and
# grid lines are grey, so a canvas with only those counts zero).
COUNT_COLOUR = """([selector, hex]) => {
  const canvas = document.querySelector(selector + " canvas");
  if (!canvas) return -1;
  const n = parseInt(hex.slice(1), 16);
  const [r, g, b] = [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < px.length; i += 4) {
    if (px[i + 3] > 200 && Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) +
        Math.abs(px[i + 2] - b) < 60) count++;
  }
  return count;
}"""
SERIES_BLUE = "#58a6ff"  # the first colour of the page's palette
LOSS_RED = "#ff7b72"
NUMBER = re.compile(r"^\d")
NONZERO = re.compile(r"^(0\.\d*[1-9]|[1-9])")


FAKE_SAMPLE = {
    "seq": 1,
    "t": 1.0,
    "requests": {"rate": 5.0, "errors": 0.0, "client_errors": 0.0, "p50": 0.001, "p90": 0.002,
                 "p99": 0.003},
    "connections": 1,
    "upstreams": {},
    "models": {},
    "guard": None,
}  # fmt: skip


@dataclass
class Live:
    server: Server
    upstreams: list[TestUpstream]
    load: Load


class Load:
    """Background clients: XOR training and inference, and proxied requests, each on its own
    keep-alive connection, paced so that the browser keeps a core's share."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(kind, i), daemon=True)
            for i, kind in enumerate(["train", "train", "predict", "proxy", "proxy"])
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)

    def _run(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            while not self.stop.is_set():
                if kind == "train":
                    a, b = rng.randint(0, 1), rng.randint(0, 1)
                    body = {"inputs": [[a, b]], "targets": [[a ^ b]]}
                    conn.request("POST", "/models/xor/train", json.dumps(body), headers)
                elif kind == "predict":
                    rows = [
                        [rng.randint(0, 1), rng.randint(0, 1)] for _ in range(rng.randint(1, 8))
                    ]
                    conn.request(
                        "POST", "/models/xor/predict", json.dumps({"inputs": rows}), headers
                    )
                else:
                    conn.request("GET", f"/api/item/{rng.randint(0, 99)}")
                conn.getresponse().read()
                # Pacing, not synchronisation: a few hundred requests/s in all.
                self.stop.wait(rng.uniform(0.002, 0.02))
        except OSError as exc:  # the server going away is part of the test
            if not self.stop.is_set():
                self.errors.append(f"{kind}: {exc!r}")
        finally:
            conn.close()


def write_config(tmp: Path, ups: list[TestUpstream], token: str | None = None) -> Path:
    servers = ", ".join(f'"{u.address}"' for u in ups)
    token_line = f'token = "{token}"' if token else ""
    text = f"""
[server]
listen = "127.0.0.1:0"
{token_line}

[models.xor]
path = "{XOR}"
weights = false

[models.xor.train]
enabled = true
max_batch = 64
durability = "none"

[upstreams.backend]
servers = [{servers}]
policy = "learned"
learned = {{ state_dir = "{tmp / "learned"}" }}

[[routes]]
prefix = "/api/"
upstream = "backend"
"""
    path = tmp / "webtorch.toml"
    path.write_text(text)
    return path


@contextmanager
def live_server(tmp: Path, token: str | None = None) -> Iterator[Live]:
    with (
        upstreams("a", "b") as ups,
        serve_process(write_config(tmp, ups, token)) as server,
        Load(server.port, token) as load,
    ):
        yield Live(server, ups, load)


def painted(page: Page, chart: str) -> int:
    """Pixels drawn at all on a chart's canvas."""
    count: int = page.evaluate(
        """(selector) => {
          const canvas = document.querySelector(selector + " canvas");
          if (!canvas) return -1;
          const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
          let count = 0;
          for (let i = 3; i < px.length; i += 4) if (px[i] > 0) count++;
          return count;
        }""",
        f'[data-chart="{chart}"]',
    )
    return count


def counts(page: Page, chart: str, colour: str) -> int:
    count: int = page.evaluate(COUNT_COLOUR, [f'[data-chart="{chart}"]', colour])
    return count


def test_dashboard_live_under_load_then_server_gone(
    browser: Browser, artifacts: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    with live_server(tmp_path) as live:
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(live.server.url + "/dashboard")
        body = page.locator("body")
        expect(body).to_have_attribute("data-state", "live", timeout=LIVE_TIMEOUT_MS)

        # Training shows up: a loss number, and a loss curve drawn on its chart.
        loss = page.locator('[data-model="xor"] [data-stat="loss"]')
        expect(loss).to_have_text(NUMBER, timeout=LIVE_TIMEOUT_MS)
        page.wait_for_function(
            "() => window.webtorchDashboard.store.samples.filter(s => s.models.xor && "
            "s.models.xor.loss != null).length >= 2",
            timeout=LIVE_TIMEOUT_MS,
        )

        # Requests/s is a number, and it changes as new samples arrive.
        rps = page.locator("#stat-rps")
        expect(rps).to_have_text(NONZERO, timeout=LIVE_TIMEOUT_MS)
        first = rps.text_content()
        seq = int(body.get_attribute("data-seq") or 0)
        page.wait_for_function(
            "([first, seq]) => +document.body.dataset.seq > seq && "
            "document.querySelector('#stat-rps').textContent !== first",
            arg=[first, seq],
            timeout=LIVE_TIMEOUT_MS,
        )

        # Both upstreams listed, healthy, and the proxied traffic split between them.
        for upstream in live.upstreams:
            row = page.locator(
                f'table[data-upstream-table="backend"] tr[data-server="{upstream.address}"]'
            )
            expect(row).to_be_visible()
            expect(row.locator('[data-col="state"]')).to_have_text("healthy")
        assert all(u.hits for u in live.upstreams)

        # The charts hold data and draw it: the series colours are on their canvases.
        page.wait_for_function(
            "() => window.webtorchDashboard.store.samples.length >= 3", timeout=LIVE_TIMEOUT_MS
        )
        assert counts(page, "requests", SERIES_BLUE) > 50
        assert counts(page, "share", SERIES_BLUE) > 20
        assert counts(page, "loss", LOSS_RED) > 20
        assert painted(page, "share-map") > 1000  # the heat map's cells (its own canvas)
        for name in ["requests", "latency", "share", "inflight", "server-latency", "rows", "loss"]:
            assert page.locator(f'[data-chart="{name}"] canvas').count() >= 1, name
        expect(page.locator("#guard-off")).to_have_text("Guard not enabled.")
        assert body.get_attribute("data-render-error") is None
        page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)

        # The server goes away: the page says so within a few seconds, and keeps trying.
        live.load.stop.set()
        live.server.send(signal.SIGKILL)
        live.server.wait(10)
        expect(body).to_have_attribute("data-state", "error", timeout=8_000)
        banner = page.locator("#banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("Lost contact with the server")
        page.screenshot(path=str(artifacts / "dashboard-error.png"), full_page=True)
        assert errors == [], errors
        page.close()


def test_dashboard_needs_the_token(browser: Browser, artifacts: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with upstreams("a") as ups, serve_process(write_config(tmp_path, ups, TOKEN)) as server:
        url = server.url + "/dashboard"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/stats", timeout=10)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic ")
        request = urllib.request.Request(
            url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["models"]["xor"]["trainable"] is True

        # The browser's own request, with no credentials: refused, with the challenge that
        # makes a browser prompt for them.
        anonymous = browser.new_context()
        response = anonymous.request.get(url)
        assert response.status == 401
        assert response.headers["www-authenticate"].startswith("Basic ")
        anonymous.close()

        context = browser.new_context(
            http_credentials={"username": "me", "password": TOKEN},
            viewport={"width": 1366, "height": 768},
        )
        page = context.new_page()
        page.goto(url)
        body = page.locator("body")
        banner = page.locator("#banner")
        expect(body).to_have_attribute("data-state", "live", timeout=LIVE_TIMEOUT_MS)
        servers = page.locator('table[data-upstream-table="backend"] tr[data-server]')
        expect(servers).to_have_count(1)
        expect(banner).to_be_hidden()

        # The learned policy's guard rail: the network decides; then (the server's answers,
        # changed here) backed off to its prior, said in the warning colour.
        rail = page.locator('[data-group="backend"] .guard-rail')
        expect(rail).to_have_text("guard rail: the network decides · 0 back-offs")
        expect(rail).to_have_attribute("data-backed-off", "false")

        def backed_off(route: Route) -> None:
            answer = json.loads(route.fetch().body())
            answer["upstreams"]["backend"].update(guard_backoffs=2, backed_off_for=41.5)
            route.fulfill(status=200, body=json.dumps(answer))

        page.route("**/dashboard/stats*", backed_off)
        expect(rail).to_have_text(
            "guard rail: following peak-EWMA for 42 s more · 2 back-offs", timeout=5_000
        )
        expect(rail).to_have_attribute("data-backed-off", "true")
        page.unroute("**/dashboard/stats*")

        # The page's own states, by answering its polls here: a refused token, lost contact,
        # then the server back (the banner goes away by itself).
        stats = "**/dashboard/stats*"
        page.route(stats, lambda route: route.fulfill(status=401, body="{}"))
        expect(body).to_have_attribute("data-state", "unauthorized", timeout=5_000)
        expect(banner).to_contain_text("token")
        page.unroute(stats)
        page.route(stats, lambda route: route.abort())
        expect(body).to_have_attribute("data-state", "error", timeout=5_000)
        expect(banner).to_contain_text("Lost contact with the server")
        page.unroute(stats)
        expect(body).to_have_attribute("data-state", "live", timeout=5_000)
        expect(banner).to_be_hidden()

        # Another server answers (a restart: another start time, an older sequence number): the
        # page drops what it held and shows the new server's history only; and back again.
        restarted = json.dumps(
            {"version": "0.0", "started": 1.0, "now": 2.0, "interval": 1.0, "seq": 1,
             "samples": [FAKE_SAMPLE], "upstreams": {}, "models": {}, "guard": None}
        )  # fmt: skip
        page.route(stats, lambda route: route.fulfill(status=200, body=restarted))
        expect(page.locator("#server-version")).to_have_text("0.0", timeout=5_000)
        assert page.evaluate("window.webtorchDashboard.store.samples.length") == 1
        expect(page.locator('[data-empty="upstreams"]')).to_be_visible()
        expect(servers).to_have_count(0)
        # A server of several workers (workers/board.py): each worker's requests/s is drawn
        # beside the total, in the requests chart's legend.
        workers = {"0": {"pid": 10, "rate": 3.0, "errors": 0.0, "connections": 1},
                   "1": {"pid": 11, "rate": 2.0, "errors": 0.0, "connections": 0}}  # fmt: skip
        several = json.dumps(
            {"version": "0.0", "started": 3.0, "now": 4.0, "interval": 1.0, "seq": 4,
             "samples": [{**FAKE_SAMPLE, "seq": 4, "workers": workers}], "upstreams": {},
             "models": {}, "guard": None, "workers": [{"slot": 0, "pid": 10, "requests": 9}]}
        )  # fmt: skip
        page.unroute(stats)
        page.route(stats, lambda route: route.fulfill(status=200, body=several))
        legend = page.locator('#panel-traffic .item[data-series="worker 1"]')
        expect(legend).to_contain_text("2", timeout=5_000)
        expect(page.locator('#panel-traffic .item[data-series="worker 0"]')).to_contain_text("3")
        expect(page.locator("#stat-rps")).to_have_text("5")
        page.unroute(stats)
        expect(servers).to_have_count(1, timeout=5_000)
        assert page.evaluate("window.webtorchDashboard.store.samples.length") > 1
        assert body.get_attribute("data-render-error") is None
        context.close()

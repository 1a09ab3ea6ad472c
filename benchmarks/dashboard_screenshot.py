"""Screenshots of the live dashboard under real load, for the README.

    .venv/bin/python benchmarks/dashboard_screenshot.py [--scale 5] [--rate R] [--out docs/img]

One ``webtorch serve`` does two jobs at once, as in the README's dashboard section:
  - it proxies the traffic lab's slow-node scenario (``src/webtorch_lab/scenarios/slow-node.toml``:
    11 simulated upstreams, one of them 2 s slower for the middle half of the run), sent by the
    lab's open-loop generator, with ``policy = "learned"``; the lab's own helper processes
    (``webtorch_lab.sim``, ``webtorch_lab.generator``) run the upstreams and the load;
  - it serves and trains the XOR example from its initial weights: a few clients POST training
    examples and predictions the whole time.
Headless Chromium (Debian's, through Playwright; never ``playwright install``) keeps the dashboard
open throughout and takes full-page shots: ``dashboard-slow.png`` two thirds of the way through
the slow spell, ``dashboard.png`` just before the load ends (the whole story: the slow node, its
traffic drained, its recovery). With ``--scale 5`` (the default) the scenario runs its original
timeline: 60 s, slow from 15 s to 45 s. Needs Chromium (``apt-get install chromium``) and
playwright (the dev extra).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import webtorch_harness as harness
from webtorch_lab import balancers, procs, runner
from webtorch_lab.procs import Helper, Pinning
from webtorch_lab.scenario import BalancerSpec, find, load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # launched as the browser tests launch it: tests/browser/chromium.py
from tests.browser.chromium import CHROMIUM_ARGS, chromium_path  # noqa: E402

VIEWPORT = {"width": 1366, "height": 768}  # a laptop screen

XOR_SECTION = """
[models.xor]
path = {path}
weights = false  # from its initial weights, so that the loss curve has somewhere to go

[models.xor.train]
enabled = true
max_batch = 64
durability = "none"

# The guard watching (it decides and counts, and refuses nothing), with a per-client budget the
# lab's single load generator outruns: the guard panel shows what enforcing would have done.
[guard]
mode = "monitor"
rate = 100
burst = 200
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=5.0, help="scenario timeline x this")
    parser.add_argument("--rate", type=float, help="proxied requests/s (default: the scenario's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--keep", type=Path, help="keep the logs and configs in this directory")
    args = parser.parse_args()

    chromium = chromium_path()
    if chromium is None:
        sys.exit("needs Debian's Chromium: apt-get install chromium (or WEBTORCH_CHROMIUM=...)")
    from playwright.sync_api import sync_playwright

    scenario = load(find("slow-node"))
    if args.rate is not None:
        scenario = scenario.model_copy(
            update={"load": scenario.load.model_copy(update={"rate": args.rate})}
        )
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="webtorch-dashboard-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    procs.raise_open_files()

    pinning = Pinning()  # nothing pinned: the browser needs a share of both cores
    sim = Helper("webtorch_lab.sim", workdir / "sim.log", pinning)
    generator = Helper("webtorch_lab.generator", workdir / "generator.log", pinning)
    server: harness.Server | None = None
    clients: XorClients | None = None
    try:
        scenario_json = scenario.model_dump(mode="json")
        ports = sim.ask(
            {"cmd": "up", "scenario": scenario_json, "scale": args.scale, "seed": scenario.seed},
            timeout=30,
        )["ports"]
        config_path = workdir / "webtorch.toml"
        xor_py = Path(str(resources.files("webtorch.examples") / "xor.py"))
        config_path.write_text(
            balancers.webtorch_config(
                scenario, BalancerSpec(kind="webtorch", policy="learned"), ports
            )
            + XOR_SECTION.format(path=json.dumps(str(xor_py)))
        )
        server = harness.serve(
            config_path,
            workdir=workdir,
            listen=None,
            command=balancers.webtorch_command(),
            timeout=runner.START_TIMEOUT,
        )
        server.wait_http("/health", timeout=runner.PROXY_TIMEOUT)  # it proxies to an upstream
        port = server.port
        assert port is not None
        url = f"http://127.0.0.1:{port}/dashboard"
        print(f"serving at {url}; scenario {scenario.name} x{args.scale}, {workdir}")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_selector('body[data-state="live"]', timeout=30_000)

            clients = XorClients(port)
            t0 = time.monotonic() + runner.LEAD_S + scenario.warmup
            sim.ask({"cmd": "start", "t0": t0}, timeout=10)
            result: dict[str, Any] = {}
            load_thread = threading.Thread(
                target=lambda: result.update(
                    generator.ask(
                        {
                            "cmd": "run",
                            "scenario": scenario_json,
                            "scale": args.scale,
                            "seed": scenario.seed,
                            "port": port,
                            "t0": t0,
                            "out": str(workdir / "records.csv"),
                        },
                        timeout=runner.run_seconds(scenario, args.scale) + 60,
                    )
                ),
                daemon=True,
            )
            load_thread.start()
            # Two thirds through the slow spell, then just before the load ends.
            start, end = next((f.start, f.end) for _name, f in scenario.fault_windows(args.scale))
            shots = [
                (start + (end - start) * 2 / 3, "dashboard-slow.png"),
                (scenario.duration * args.scale - 1.5, "dashboard.png"),
            ]
            for at, name in shots:
                while time.monotonic() < t0 + at:
                    page.wait_for_timeout(200)
                page.wait_for_selector('body[data-state="live"]', timeout=10_000)
                problem = page.locator("body").get_attribute("data-render-error")
                if problem:
                    raise SystemExit(f"the page failed to draw: {problem}")
                page.screenshot(path=str(args.out / name), full_page=True)
                print(f"wrote {args.out / name} at {at:.0f} s")
            load_thread.join(60)
            browser.close()
        print(f"load: {result.get('done', result)}; xor clients: {clients.summary()}")
    finally:
        if clients is not None:
            clients.close()
        if server is not None:
            server.close()
        sim.close()
        generator.close()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


class XorClients:
    """Training and inference on XOR beside the proxied load: two clients POST one training
    example each ~25 ms (the loss falls over the first seconds, not in one), two ask for
    predictions of 1 to 16 rows each ~10 ms."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.counts = {"train": 0, "predict": 0, "errors": 0}
        self.threads = [
            threading.Thread(target=self._run, args=(kind, seed), daemon=True)
            for seed, kind in enumerate(["train", "train", "predict", "predict"])
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            if kind == "train":
                a, b = rng.randint(0, 1), rng.randint(0, 1)
                path, body, pause = (
                    "/models/xor/train",
                    {"inputs": [[a, b]], "targets": [[a ^ b]]},
                    0.025,
                )
            else:
                rows = [[rng.randint(0, 1), rng.randint(0, 1)] for _ in range(rng.randint(1, 16))]
                path, body, pause = "/models/xor/predict", {"inputs": rows}, 0.01
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                conn.getresponse().read()
                self.counts[kind] += 1
            except (OSError, http.client.HTTPException):
                self.counts["errors"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.stop.wait(pause)
        conn.close()

    def summary(self) -> dict[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


if __name__ == "__main__":
    sys.exit(main())

"""examples/textcls served as shipped: pipeline.toml (one process) and split.toml (the stage
server and the front, as the README starts them) both predict, refuse a page with no text by
record, and train over HTTP: accuracy on held-out pages goes up after a few small steps."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import webtorch_harness as harness
from webtorch.examples.textcls import train

EXAMPLE = Path(train.__file__).resolve().parent
READY = "/v2/health/ready"


def check_serves_and_trains(url: str) -> None:
    page = "<html><script>var topics=['finance']</script><nav>Sports</nav></html>"
    body = json.dumps({"records": ["<p>the striker scored a goal</p>", page]}).encode()
    request = urllib.request.Request(
        f"{url}/pipelines/textcls/predict", body, {"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("a page with no text was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 422
        answer = json.loads(exc.read())
        assert (answer["stage"], answer["record"]) == ("clean", 1)
        assert "clean;dur=" in exc.headers["server-timing"]
    before = train.accuracy(url, "textcls", 30, seed=1, batch=15)
    # 120 pages (10 steps): over 40 initialisations of the (unseeded) network, 60 pages left
    # held-out accuracy between 0.77 and 1.0; 120 pages reached 1.0 every time.
    losses = train.train(url, "textcls", 120, seed=0, batch=12)
    after = train.accuracy(url, "textcls", 30, seed=1, batch=15)
    assert losses[-1] < losses[0]
    assert after >= 0.8 and after > before + 0.3, (before, after)


def test_pipeline_toml_serves_and_trains(tmp_path: Path) -> None:
    config = EXAMPLE / "pipeline.toml"
    with harness.serve(config, workdir=tmp_path, ready_path=READY) as server:
        check_serves_and_trains(server.url)
        assert (tmp_path / "webtorch-state" / "textcls").is_dir()  # the WAL and checkpoints


def test_split_toml_serves_and_trains(tmp_path: Path) -> None:
    # The README's commands, on ports of the servers' own choosing (a port found free here
    # could be taken before a child binds it): one stage server may serve several stages, and
    # serving them it calls none of the groups, so the front's copy of the file is written once
    # it listens.
    text = (EXAMPLE / "split.toml").read_text()
    text = text.replace('path = "model.py"', f'path = "{EXAMPLE / "model.py"}"')
    text = text.replace('path = "textcls.py"', f'path = "{EXAMPLE / "textcls.py"}"')
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "split.toml").write_text(text)
    with harness.serve(
        tmp_path / "stages" / "split.toml",
        "--stages",
        "clean,featurize,label",
        workdir=tmp_path / "stages",
        ready_path=READY,
    ) as stages:
        config = tmp_path / "split.toml"
        config.write_text(re.sub(r'"127\.0\.0\.1:809\d"', f'"127.0.0.1:{stages.port}"', text))
        with harness.serve(config, workdir=tmp_path, ready_path=READY) as front:
            check_serves_and_trains(front.url)

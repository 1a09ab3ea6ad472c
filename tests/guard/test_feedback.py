"""Online adaptation end to end: label requests by id, the detector is fine-tuned off the loop,
swapped in, saved, and loaded again by the next server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.conftest import XOR, Running, serve_in_thread
from tests.proxy.test_forward import request
from webtorch import config as wt_config

TOKEN = "feedback-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Accept": "application/json",
}


def config(tmp_path: Path, management: bool = True) -> wt_config.Config:
    return wt_config.from_dict(
        {
            "server": {"token": TOKEN, "management": management},
            "models": {"xor": {"path": str(XOR)}},
            "guard": {
                "mode": "enforce",
                "block": 0.7,  # a few labels move a score a long way, not to certainty
                "feedback": True,
                "feedback_batch": 6,
                "state_dir": str(tmp_path / "guard"),
            },
        }
    )


def get(running: Running, query: str) -> tuple[int, str]:
    status, headers, _ = request(running, "GET", f"/v2?{query}", headers=BROWSER)
    return status, headers["x-request-id"]


def feedback(running: Running, labels: list[dict[str, str]] | str) -> tuple[int, Any]:
    body = labels if isinstance(labels, str) else json.dumps({"labels": labels})
    headers = {**AUTH, "Content-Type": "application/json"}
    status, _, answer = request(running, "POST", "/guard/feedback", body.encode(), headers)
    return status, json.loads(answer)


def test_labels_teach_the_detector_and_survive_a_restart(tmp_path: Path) -> None:
    marker = "q=zqxj+vortal+{i}"  # an "attack" of this site's own: nothing the model knows
    with serve_in_thread(config(tmp_path)) as running:
        for i in range(40):  # ordinary traffic: what the fine-tuning replays as benign
            assert get(running, f"page={i}&sort=price")[0] == 200
        missed = [get(running, marker.format(i=i)) for i in range(6)]
        assert {status for status, _ in missed} == {200}  # the model lets them by
        ids = [rid for _, rid in missed]  # and the operator, seeing them, labels them
        benign_ids = [get(running, f"page={i}&sort=name")[1] for i in range(3)]
        status, answer = feedback(
            running,
            [{"request_id": rid, "label": "attack"} for rid in ids]
            + [{"request_id": rid, "label": "benign"} for rid in benign_ids]
            + [{"request_id": "no-such-id", "label": "attack"}],
        )
        assert status == 202 and answer["accepted"] == 9 and answer["unknown"] == ["no-such-id"]
        assert answer["started_round"] is True
        feedback_ = running.app.feedback
        assert feedback_ is not None
        asyncio.run_coroutine_threadsafe(feedback_.wait(), running.loop).result(120)
        assert feedback_.rounds == 1
        status, _ = get(running, marker.format(i=100))
        assert status == 403  # the new weights are in: the taught pattern is blocked
        assert get(running, "page=7&sort=price")[0] == 200  # and ordinary traffic is not
    saved = tmp_path / "guard" / "guard.safetensors"
    assert saved.is_file()
    # Learned from clients' requests: the owner's only (issue 19's sibling of item 7), whatever
    # the umask (the suite's is 022: the old save left 0644 in a 0755 directory).
    assert (saved.stat().st_mode & 0o777, saved.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert [p.name for p in saved.parent.iterdir()] == ["guard.safetensors"]  # no temp left
    with serve_in_thread(config(tmp_path)) as running:
        assert get(running, marker.format(i=100))[0] == 403  # the adapted weights were loaded


def test_feedback_is_a_management_endpoint(tmp_path: Path) -> None:
    with serve_in_thread(config(tmp_path, management=False)) as running:
        status, body = feedback(running, [{"request_id": "x", "label": "attack"}])
        assert status == 404 and "management" in body["error"]
    with serve_in_thread(config(tmp_path)) as running:
        status, _, _ = request(
            running, "POST", "/guard/feedback", b"{}", {"Content-Type": "application/json"}
        )
        assert status == 401
        assert feedback(running, "not json")[0] == 400
        status, body = feedback(running, [{"request_id": "x", "label": "maybe"}])
        assert status == 400 and "labels[0].label" in body["error"]

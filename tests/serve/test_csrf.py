"""CSRF (issue 19, item 1): every endpoint that changes state refuses what a web page can send
cross-site without a CORS preflight (a form or text body, no Content-Type), and requests that a
browser marks as coming from another site; token or not. Same-origin JSON still works."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.serve.test_repository import SCALE_PY
from tests.serve.test_server_models import Reply, call
from webtorch import config as wt_config

TOKEN = "s3cret-token-0123456789"
TRAIN = {"inputs": [[0, 1]], "targets": [[1]]}
OIP_TRAIN = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}],
    "targets": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
}

# What a page elsewhere can send without a preflight, and what browsers say about such a request.
SIMPLE_TYPES = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    None,  # fetch(url, {mode: "no-cors", body: new Blob([...])}) sends no Content-Type
]
FOREIGN = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # sandboxed frames, file:// pages
    {"Origin": "http://127.0.0.1:1"},  # same site, another port: another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
]


def write_config(tmp_path: Path, **server: Any) -> Path:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "scale.py").write_text(SCALE_PY.format(factor=2))
    settings = {"management": True, "model_dir": str(models), **server}
    lines = ["[server]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    lines += [
        "[models.xor]",
        f"path = {json.dumps(str(XOR))}",
        "[models.xor.train]",
        "enabled = true",
        f"state_dir = {json.dumps(str(tmp_path / 'state'))}",
    ]
    path = tmp_path / "webtorch.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    path = write_config(tmp_path_factory.mktemp("csrf"), allowed_origins=["https://app.example"])
    with serve_in_thread(wt_config.load(path), path) as server:
        yield server


# Every state-changing endpoint, with a body it accepts.
ENDPOINTS = [
    ("/models/xor/train", TRAIN),
    ("/v2/models/xor/train", OIP_TRAIN),
    ("/v2/repository/models/scale/load", None),
    ("/v2/repository/models/scale/unload", None),
    ("/admin/reload", None),
    ("/guard/feedback", {"labels": [{"request_id": "x", "label": "attack"}]}),
]


def send(running: Running, path: str, body: Any, content_type: str | None, **headers: str) -> Reply:
    raw = b"" if body is None else json.dumps(body).encode()
    if content_type is not None:
        headers["Content-Type"] = content_type
    return call(running, "POST", path, raw, headers)


def step(running: Running) -> int:
    return int(call(running, "GET", "/models/xor/train").json()["step"])


def served(running: Running) -> set[str]:
    return set(running.app.repository.served)


@pytest.mark.parametrize(("path", "body"), ENDPOINTS)
def test_simple_content_types_are_refused(running: Running, path: str, body: Any) -> None:
    before = (step(running), served(running))
    for content_type in SIMPLE_TYPES:
        reply = send(running, path, body, content_type)
        assert reply.status == 415, (content_type, reply)
        assert "application/json" in reply.json()["error"]
    assert (step(running), served(running)) == before  # nothing trained, loaded or unloaded


@pytest.mark.parametrize(("path", "body"), ENDPOINTS)
def test_requests_from_other_sites_are_refused(running: Running, path: str, body: Any) -> None:
    before = (step(running), served(running))
    for headers in FOREIGN:
        reply = send(running, path, body, "application/json", **headers)
        assert reply.status == 403, (headers, reply)
        error = reply.json()["error"]
        assert ("Origin" in error or "Sec-Fetch-Site" in error) and "allowed_origins" in error
    assert (step(running), served(running)) == before


def test_same_origin_json_is_accepted_everywhere(running: Running) -> None:
    origin = f"http://127.0.0.1:{running.port}"  # the Host http.client sends
    browser = {"Origin": origin, "Sec-Fetch-Site": "same-origin"}
    start = step(running)
    assert send(running, "/models/xor/train", TRAIN, "application/json", **browser).status == 200
    oip = send(running, "/v2/models/xor/train", OIP_TRAIN, "application/json; charset=utf-8")
    assert oip.status == 200, oip  # no Origin, no Sec-Fetch-Site: curl, SDKs
    assert step(running) == start + 2
    load = "/v2/repository/models/scale/load"
    assert send(running, load, None, "application/json", **browser).status == 200
    assert "scale" in served(running)
    unload = "/v2/repository/models/scale/unload"
    assert (
        send(running, unload, None, "application/json", **{"Sec-Fetch-Site": "none"}).status == 200
    )
    assert "scale" not in served(running)
    assert send(running, "/admin/reload", None, "application/json", **browser).status == 200
    # Past the CSRF check: this server has no guard, so feedback is off.
    feedback = send(running, "/guard/feedback", {"labels": []}, "application/json", **browser)
    assert feedback.status == 404 and "guard feedback is off" in feedback.json()["error"]


def test_an_allowed_origin_may_change_state_from_its_own_site(running: Running) -> None:
    start = step(running)
    headers = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
    reply = send(running, "/models/xor/train", TRAIN, "application/json", **headers)
    assert reply.status == 200, reply
    assert step(running) == start + 1


def test_binary_training_needs_no_json_type(running: Running) -> None:
    """The binary tensor extension's header is no CORS-safelisted one: a browser preflights it."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                }
            ],
            "targets": [
                {
                    "name": "y",
                    "datatype": "FP32",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": 4},
                }
            ],
        }
    ).encode()
    body = header + struct.pack("<3f", 0, 1, 1)
    for content_type in ("application/octet-stream", None):
        headers = {"Inference-Header-Content-Length": str(len(header))}
        if content_type is not None:
            headers["Content-Type"] = content_type
        reply = call(running, "POST", "/v2/models/xor/train", body, headers)
        assert reply.status == 200, (content_type, reply)


def test_predict_keeps_accepting_simple_content_types(running: Running) -> None:
    body = b'{"inputs": [[0, 1]]}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        reply = call(running, "POST", "/models/xor/predict", body, {"Content-Type": content_type})
        assert reply.status == 200, reply


def test_the_token_does_not_stand_in_for_the_checks(tmp_path: Path) -> None:
    path = write_config(tmp_path, token=TOKEN)
    with serve_in_thread(wt_config.load(path), path) as running:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        text = send(running, "/models/xor/train", TRAIN, "text/plain", **auth)
        assert text.status == 415, text
        cross = send(
            running, "/models/xor/train", TRAIN, "application/json", Origin="http://e.x", **auth
        )
        assert cross.status == 403, cross
        # The checks come first; a missing token is then a 401, and the token passes.
        assert send(running, "/models/xor/train", TRAIN, "application/json").status == 401
        assert send(running, "/models/xor/train", TRAIN, "application/json", **auth).status == 200


def test_allowed_origins_must_be_origins() -> None:
    for bad in ("*", "app.example", "https://app.example/", "https://app.example/path"):
        with pytest.raises(wt_config.ConfigError, match="allowed_origins"):
            wt_config.from_dict({"server": {"allowed_origins": [bad]}})
    cfg = wt_config.from_dict({"server": {"allowed_origins": ["HTTPS://App.Example:8443"]}})
    assert cfg.server.allowed_origins == ["https://app.example:8443"]


def test_a_dns_name_matching_the_host_is_not_enough(running: Running) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1 once its page has loaded, and its
    requests are then same-origin (Origin and Host both evil.example). Only an IP literal or
    localhost (which no one else can point elsewhere) or a listed origin may change state."""
    start = step(running)
    for name in ("evil.example", "app.example"):
        host = f"{name}:{running.port}"
        rebound = {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
        reply = send(running, "/models/xor/train", TRAIN, "application/json", **rebound)
        assert reply.status == 403 and "DNS rebinding" in reply.json()["error"], reply
    assert step(running) == start
    for host in (f"localhost:{running.port}", f"[::1]:{running.port}", f"127.0.0.1:{running.port}"):
        own = {"Host": host, "Origin": f"http://{host}"}
        assert send(running, "/models/xor/train", TRAIN, "application/json", **own).status == 200
    listed = {"Host": "app.example", "Origin": "https://app.example"}
    assert send(running, "/models/xor/train", TRAIN, "application/json", **listed).status == 200

"""``webtorch serve`` with WebSocket streams open gets SIGTERM: each gets a close frame with
1001 (going away), and once they have answered it the process exits cleanly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import serve_process
from tests.streams.conftest import MODELS

TIMEOUT = 30


def test_sigterm_closes_every_stream_with_1001_then_exits(tmp_path: Path) -> None:
    config = tmp_path / "webtorch.toml"
    config.write_text(
        f'[models.gru]\npath = "{MODELS / "gru.py"}"\n\n[streams]\n', encoding="utf-8"
    )
    with serve_process(config) as proc:
        url = f"ws://127.0.0.1:{proc.port}/v2/models/gru/stream"
        with connect(url) as a, connect(url) as b:
            for ws in (a, b):
                ws.recv(timeout=TIMEOUT)
                ws.send(json.dumps({"x": [1, 2, 3]}))
                assert "outputs" in json.loads(ws.recv(timeout=TIMEOUT))
            proc.send(signal.SIGTERM)
            for ws in (a, b):
                with pytest.raises(ConnectionClosed) as info:
                    ws.recv(timeout=TIMEOUT)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert proc.wait(TIMEOUT) == 0
        output = proc.stop().log
    assert "webtorch stopped" in output
    assert "Traceback" not in output

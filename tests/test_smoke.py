import json
import urllib.request

from tests.conftest import Running


def test_predict_short_form(xor_server: Running) -> None:
    req = urllib.request.Request(
        xor_server.url + "/models/xor/predict",
        data=json.dumps({"inputs": [[0, 1], [1, 1]]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        body = json.loads(resp.read())
    assert body["outputs"][0][0] > 0.9
    assert body["outputs"][1][0] < 0.1

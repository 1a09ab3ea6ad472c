"""``webtorch serve`` as a process: graceful shutdown on SIGTERM and SIGINT, and TLS.

In-flight requests are made deterministic with a "gate" model whose forward pass, for inputs
starting with 7, reports to the test over a socket and waits there until the test lets it go: the
test knows the request is being computed when it sends the signal, and waits on sockets only.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import orjson
import pytest

from tests.conftest import XOR, serve_process
from tests.http.test_conformance import Reader, wait_closed
from tests.http.test_protocol import req
from webtorch_harness import Server

TIMEOUT = 30.0

GATE = """\
import socket

import torch
from torch import nn

import webtorch

PORT = {port}


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 7).any()):
            with socket.create_connection(("127.0.0.1", PORT)) as sock:
                sock.sendall(b"started")
                sock.recv(16)  # until the test says go (or goes away)
        return x.sum(dim=1, keepdim=True)


model = webtorch.Model(
    network=Gate,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 2))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
)
"""


@pytest.fixture
def gate_listener() -> Iterator[socket.socket]:
    """Where gate models report that a forward pass has started."""
    with closing(socket.create_server(("127.0.0.1", 0))) as listener:
        listener.settimeout(TIMEOUT)
        yield listener


def write_config(tmp_path: Path, gate_port: int, tls: tuple[Path, Path] | None = None) -> Path:
    (tmp_path / "gate.py").write_text(GATE.format(port=gate_port))
    lines = [
        "[server]",
        'listen = "127.0.0.1:8080"',
        "",
        "[models.xor]",
        f'path = "{XOR}"',
        "",
        # Two gated models: each has its own worker thread, so both can be mid-forward at once.
        "[models.gate1]",
        'path = "gate.py"',
        'compute = "thread"',
        "",
        "[models.gate2]",
        'path = "gate.py"',
        'compute = "thread"',
    ]
    if tls is not None:
        lines += ["", "[server.tls]", f'cert = "{tls[0].name}"', f'key = "{tls[1].name}"']
    path = tmp_path / "webtorch.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def predict(model: str, *rows: list[float]) -> bytes:
    body = orjson.dumps({"inputs": list(rows)})
    return req("POST", f"/models/{model}/predict", [("Content-Type", "application/json")], body)


def connect(proc: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proc.port), TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def rest_of_output(proc: Server) -> str:
    """Its whole log, once it has exited."""
    return proc.stop().log


def test_sigterm_drains_in_flight_requests(tmp_path: Path, gate_listener: socket.socket) -> None:
    config = write_config(tmp_path, gate_listener.getsockname()[1])
    with serve_process(config) as proc, ExitStack() as stack:
        # Idle keep-alive connections, each having been served.
        idle = [stack.enter_context(closing(connect(proc))) for _ in range(3)]
        for i, sock in enumerate(idle):
            sock.sendall(predict("xor", [i % 2, 1]))
            [resp] = Reader(sock).read(1)
            assert resp.status == 200

        # Two requests in flight: sent, being computed, responses not read.
        busy = [stack.enter_context(closing(connect(proc))) for _ in range(2)]
        gates = []
        for sock, model in zip(busy, ["gate1", "gate2"], strict=True):
            sock.sendall(predict(model, [7, 1], [2, 3]))
            gate, _ = gate_listener.accept()
            stack.enter_context(closing(gate))
            gate.settimeout(TIMEOUT)
            assert gate.recv(16) == b"started"
            gates.append(gate)

        proc.send(signal.SIGTERM)

        # Idle connections are closed at once, without a response.
        for sock in idle:
            assert wait_closed(sock, TIMEOUT) == b""
        # Draining began after the listener closed: new connections are refused.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proc.port), TIMEOUT).close()
        assert proc.poll() is None  # still waiting for the two requests

        for gate in gates:
            gate.sendall(b"go")
        for sock in busy:
            reader = Reader(sock)
            [resp] = reader.read(1)
            assert resp.status == 200
            assert resp.json()["outputs"] == [[8.0], [5.0]]
            assert resp.headers[b"connection"] == b"close"
            assert reader.closed
            sock.close()  # ends the server's lingering close at once

        assert proc.wait(TIMEOUT) == 0
        output = rest_of_output(proc)
    assert "draining" in output
    assert "webtorch stopped" in output
    assert "Traceback" not in output


def test_sigint_exits_cleanly(tmp_path: Path, gate_listener: socket.socket) -> None:
    config = write_config(tmp_path, gate_listener.getsockname()[1])
    with serve_process(config) as proc, closing(connect(proc)) as sock:
        sock.sendall(predict("xor", [1, 0]))
        [resp] = Reader(sock).read(1)
        assert resp.status == 200
        assert proc.stop(signal.SIGINT, TIMEOUT).returncode == 0
        assert wait_closed(sock, TIMEOUT) == b""
        output = rest_of_output(proc)
    assert "webtorch stopped" in output
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output


def test_sigterm_when_idle_exits_at_once() -> None:
    with serve_process() as proc:
        assert proc.stop(signal.SIGTERM, TIMEOUT).returncode == 0


# -- TLS --------------------------------------------------------------------------------------


def make_self_signed(cert: Path, key: Path) -> None:
    """A certificate for 127.0.0.1, with the ``cryptography`` package if it is there, else with
    the ``openssl`` command; the test is skipped when neither is."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        return
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def test_https(tmp_path: Path, gate_listener: socket.socket) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key)
    config = write_config(tmp_path, gate_listener.getsockname()[1], tls=(cert, key))
    with serve_process(config) as proc:
        assert proc.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))  # verifies chain and hostname
        conn = http.client.HTTPSConnection("127.0.0.1", proc.port, context=context, timeout=TIMEOUT)
        try:
            body = orjson.dumps({"inputs": [[0, 1], [1, 1]]})
            for _ in range(2):  # keep-alive over TLS
                conn.request(
                    "POST", "/models/xor/predict", body, {"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                assert resp.status == 200
                outputs = orjson.loads(resp.read())["outputs"]
                assert outputs[0][0] > 0.9
                assert outputs[1][0] < 0.1
            conn.request("GET", "/v2/health/ready")
            assert conn.getresponse().read() == b'{"ready":true}'
        finally:
            conn.close()

        # A client that does not trust the certificate is refused by the handshake...
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            socket.create_connection(("127.0.0.1", proc.port), TIMEOUT) as raw,
        ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
        # ... and one speaking plain HTTP to the TLS port does not bring the server down.
        with closing(connect(proc)) as plain:
            plain.sendall(req("GET", "/v2/health/live"))
            wait_closed(plain, TIMEOUT)
        with closing(context.wrap_socket(connect(proc), server_hostname="127.0.0.1")) as tls:
            tls.sendall(req("GET", "/v2/health/live"))
            [resp2] = Reader(tls).read(1)
            assert resp2.json() == {"live": True}

        assert proc.stop(signal.SIGTERM, TIMEOUT).returncode == 0

"""Config: TOML -> validated Config, errors that name the key and the file; ``webtorch check``;
devices and weights at model load."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, XOR
from webtorch import config as wt_config
from webtorch.app import App
from webtorch.errors import ConfigError, ModelLoadError
from webtorch.serve.model import load_model

GOOD = """
[server]
listen = "127.0.0.1:0"

[server.limits]
max_body = 1024

[models.xor]
path = "xor.py"
max_batch = 32
max_delay = 0.001
compute = "thread"

[[routes]]
path = "/healthz"
return = 200
body = "ok"

[[routes]]
prefix = "/api/"
model = "xor"
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory with the XOR model file and its trained weights beside it."""
    shutil.copy(XOR, tmp_path / "xor.py")
    shutil.copy(XOR.with_suffix(".safetensors"), tmp_path / "xor.safetensors")
    return tmp_path


def write(directory: Path, text: str, name: str = "webtorch.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        wt_config.load(path)
    message = str(info.value)
    assert str(path) in message  # every error names the file
    return message


def test_good_config_loads(model_dir: Path) -> None:
    cfg = wt_config.load(write(model_dir, GOOD))
    assert cfg.server.listen == "127.0.0.1:0"
    assert cfg.server.limits.max_body == 1024
    xor = cfg.models["xor"]
    assert (xor.max_batch, xor.max_delay, xor.compute, xor.device) == (32, 0.001, "thread", "cpu")
    assert cfg.resolve(xor.path) == model_dir.resolve() / "xor.py"  # relative to the file
    healthz, api = cfg.routes
    assert (healthz.path, healthz.return_, healthz.body) == ("/healthz", 200, "ok")
    assert (api.prefix, api.model) == ("/api/", "xor")


def test_parse_error_names_the_file(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "[server\nlisten = 1\n"))
    assert "not valid TOML" in message


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "absent.toml")
    assert "no such file" in message


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[sever]\nlisten = '1.2.3.4:80'\n", "sever", "Extra inputs"),
        ("[server]\nlisen = '1.2.3.4:80'\n", "server.lisen", "Extra inputs"),
        ("[server.limits]\nmax_bdy = 1\n", "server.limits.max_bdy", "Extra inputs"),
        ("[models.xor]\npath = 'xor.py'\npaht = 'x'\n", "models.xor.paht", "Extra inputs"),
        ("[[routes]]\npath = '/a'\nreturn = 200\nstatus = 1\n", "routes.0.status", "Extra inputs"),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, key: str, problem: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f"{key}: {problem}" in message


def test_base_dir_is_not_a_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "base_dir = '/'\n"))
    assert "base_dir: unknown key" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nlisten = 8080\n", "server.listen"),
        ("[server.limits]\nmax_body = 'big'\n", "server.limits.max_body"),
        ("[server.limits]\nmax_body = 0\n", "server.limits.max_body"),
        ("[server.limits]\nheader_timeout = -1.0\n", "server.limits.header_timeout"),
        ("[models.xor]\npath = 'xor.py'\nmax_batch = 'big'\n", "models.xor.max_batch"),
        ("[models.xor]\npath = 'xor.py'\nmax_batch = 0\n", "models.xor.max_batch"),
        ("[models.xor]\npath = 'xor.py'\nmax_delay = -0.5\n", "models.xor.max_delay"),
        ("[models.xor]\npath = 'xor.py'\nmax_queue = 0\n", "models.xor.max_queue"),
        ("[models.xor]\npath = 'xor.py'\ncompute = 'gpu'\n", "models.xor.compute"),
        ("[models.xor]\npath = 'xor.py'\ndevice = 3\n", "models.xor.device"),
        ("[models.xor]\nmax_batch = 4\n", "models.xor.path"),
        ("[models]\nxor = 'xor.py'\n", "models.xor"),
        ("models = ['xor.py']\n", "models"),
        ("[[routes]]\npath = '/a'\nreturn = 99\n", "routes.0.return"),
        ("routes = {path = '/a'}\n", "routes"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f"\n  {key}: " in message, message


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("localhost", "listen must be HOST:PORT, got 'localhost'"),
        ("127.0.0.1:http", "listen must be HOST:PORT"),
        ("127.0.0.1:70000", "listen must be HOST:PORT"),
        ("127.0.0.1:-1", "listen must be HOST:PORT"),
        ("", "listen must be HOST:PORT"),
    ],
)
def test_bad_listen(tmp_path: Path, listen: str, problem: str) -> None:
    message = config_error(write(tmp_path, f"[server]\nlisten = '{listen}'\n"))
    assert f"server.listen: {problem}" in message


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        (":80", ("0.0.0.0", 80)),
        ("[::1]:0", ("::1", 0)),
        ("example.org:65535", ("example.org", 65535)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert wt_config.parse_listen(listen) == expected


def test_route_referencing_a_missing_model(tmp_path: Path) -> None:
    text = "[models.xor]\npath = 'xor.py'\n\n[[routes]]\nprefix = '/api/'\nmodel = 'nope'\n"
    message = config_error(write(tmp_path, text))
    assert "routes[0].model: no model named 'nope'" in message


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ("path = '/a'\nprefix = '/b'\nreturn = 200", "exactly one of `path` or `prefix`"),
        ("return = 200", "exactly one of `path` or `prefix`"),
        ("path = 'a'\nreturn = 200", "start with '/'"),
        ("path = '/a'", "exactly one of `model`, `return` or `upstream`"),
        (
            "path = '/a'\nreturn = 200\nmodel = 'xor'",
            "exactly one of `model`, `return` or `upstream`",
        ),
    ],
)
def test_bad_routes(tmp_path: Path, route: str, problem: str) -> None:
    text = f"[models.xor]\npath = 'xor.py'\n\n[[routes]]\n{route}\n"
    message = config_error(write(tmp_path, text))
    assert "routes.0: " in message and problem in message


@pytest.mark.parametrize(
    ("routes", "problem"),
    [
        ("path = '/metrics'", "routes[0].path: '/metrics' is a built-in route"),
        ("path = '/v2'", "routes[0].path: '/v2' is a built-in route"),
        ("prefix = '/models/'", "routes[0].prefix: '/models/' is a built-in route"),
        ("prefix = '/v2/'", "routes[0].prefix: '/v2/' is a built-in route"),
    ],
)
def test_routes_cannot_shadow_builtin_routes(tmp_path: Path, routes: str, problem: str) -> None:
    message = config_error(write(tmp_path, f"[[routes]]\n{routes}\nreturn = 200\n"))
    assert problem in message


@pytest.mark.parametrize("path", ["/models/xor/predict", "/v2/models/xor/infer"])
def test_routes_cannot_shadow_a_models_routes(tmp_path: Path, path: str) -> None:
    text = f"[models.xor]\npath = '{XOR}'\n\n[[routes]]\npath = '{path}'\nreturn = 200\n"
    assert "is a model's built-in route" in config_error(write(tmp_path, text))


def test_duplicate_routes(tmp_path: Path) -> None:
    text = "[[routes]]\nprefix = '/a/'\nreturn = 200\n\n[[routes]]\nprefix = '/a/'\nreturn = 404\n"
    assert "routes[1].prefix: '/a/' repeats routes[0]" in config_error(write(tmp_path, text))
    text = "[[routes]]\npath = '/a/'\nreturn = 200\n\n[[routes]]\nprefix = '/a/'\nreturn = 404\n"
    cfg = wt_config.load(write(tmp_path, text))  # an exact path and a prefix may coincide
    assert len(cfg.routes) == 2


def test_invalid_model_name(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "[models.'a/b']\npath = 'xor.py'\n"))
    assert "models.a/b: invalid model name" in message


def test_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"api-config: invalid configuration\n  models\.m\.path"):
        wt_config.from_dict({"models": {"m": {}}}, "api-config")


def test_embedded_default_config_loads() -> None:
    path = wt_config.default_config_path()
    assert path.name == "xor.toml" and path.is_file()
    cfg = wt_config.load_default()
    assert list(cfg.models) == ["xor"]
    assert cfg.server.listen == "127.0.0.1:8080"
    model_path = cfg.resolve(cfg.models["xor"].path)
    assert model_path.is_file() and model_path.name == "xor.py"
    model = load_model("xor", model_path, cfg.models["xor"].device)
    assert model.weights is not None and model.weights.name == "xor.safetensors"


# -- webtorch check ----------------------------------------------------------------------------


def check(path: Path | None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "webtorch.cli", "check"]
    if path is not None:
        cmd.append(str(path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_good_config_exits_0(model_dir: Path) -> None:
    result = check(write(model_dir, GOOD))
    assert result.returncode == 0, result.stderr
    assert "model xor: x FP32[-1, 2] -> y FP32[-1, 1] on cpu" in result.stdout
    assert "OK" in result.stdout


def test_check_bad_config_exits_2_naming_the_key(model_dir: Path) -> None:
    path = write(model_dir, GOOD.replace("max_batch = 32", "max_batch = -3"))
    result = check(path)
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "models.xor.max_batch" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_bad_listen_flag_exits_2() -> None:
    cmd = [sys.executable, "-m", "webtorch.cli", "serve", "--listen", "localhost"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "--listen: listen must be HOST:PORT, got 'localhost'" in result.stderr
    assert "Traceback" not in result.stderr


# -- devices and weights ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_a_clear_error(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="'cuda' is configured but CUDA is not available"):
        load_model("xor", model_dir / "xor.py", "cuda")
    cfg = wt_config.load(write(model_dir, GOOD.replace('compute = "thread"', 'device = "cuda:1"')))
    with pytest.raises(ModelLoadError, match="'cuda:1' is configured but CUDA is not available"):
        App(cfg)  # fails before any socket opens


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_check_cuda_device_exits_2(model_dir: Path) -> None:
    result = check(write(model_dir, GOOD.replace('compute = "thread"', 'device = "cuda"')))
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr


@pytest.mark.parametrize("device", ["tpu", "not a device", "cuda:x"])
def test_unsupported_device(model_dir: Path, device: str) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        load_model("xor", model_dir / "xor.py", device)


XOR_IN = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def predictions(path: Path, weights: Path | None = None) -> torch.Tensor:
    model = load_model("xor", path, "cpu", weights)
    with torch.inference_mode():
        out = model.forward({"x": XOR_IN})["y"]
    assert isinstance(out, torch.Tensor)
    return out.flatten()


def test_weights_beside_the_model_change_predictions(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model_dir / "xor.py", bare / "xor.py")
    torch.manual_seed(0)
    untrained = predictions(bare / "xor.py")
    trained = predictions(model_dir / "xor.py")
    assert not torch.allclose(untrained, trained, atol=0.05)
    assert trained[0] < 0.1 and trained[1] > 0.9 and trained[2] > 0.9 and trained[3] < 0.1
    assert load_model("xor", model_dir / "xor.py").weights == model_dir / "xor.safetensors"
    assert load_model("xor", bare / "xor.py").weights is None


def test_configured_weights_file(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model_dir / "xor.py", bare / "xor.py")
    shutil.copy(model_dir / "xor.safetensors", bare / "trained.safetensors")
    text = "[models.xor]\npath = 'xor.py'\nweights = 'trained.safetensors'\n"
    cfg = wt_config.load(write(bare, text))
    app = App(cfg)
    assert app.models["xor"].weights == bare.resolve() / "trained.safetensors"
    trained = predictions(bare / "xor.py", bare / "trained.safetensors")
    assert trained[1] > 0.9 and trained[3] < 0.1
    with pytest.raises(ModelLoadError, match=r"weights file .*missing\.safetensors does not exist"):
        load_model("xor", bare / "xor.py", "cpu", bare / "missing.safetensors")


def test_weights_that_do_not_fit_the_network(model_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({"hidden.weight": torch.zeros(3, 3)}, str(model_dir / "xor.safetensors"))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model("xor", model_dir / "xor.py")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("model = 1\n", r"must define `model = webtorch\.Model\(\.\.\.\)`"),
        ("def broken(:\n", "failed to import"),
        ("raise RuntimeError('boom')\n", "failed to import"),
    ],
)
def test_bad_model_files(tmp_path: Path, source: str, problem: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ModelLoadError, match=problem) as info:
        load_model("bad", path)
    assert str(path) in str(info.value)


def test_missing_model_file(tmp_path: Path) -> None:
    cfg = wt_config.load(write(tmp_path, "[models.xor]\npath = 'nope.py'\n"))
    with pytest.raises(ModelLoadError, match=r"nope\.py does not exist"):
        App(cfg)


def test_the_lb_example_validates() -> None:
    cfg = wt_config.load(ROOT / "src" / "webtorch" / "examples" / "lb.toml")
    models = cfg.upstreams["models"]
    assert models.policy == "hash" and models.servers[2].weight == 2
    assert cfg.routes[0].upstream == "models"


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("servers = []", "upstreams.backend.servers"),
        ("servers = ['127.0.0.1']", "HOST:PORT"),
        ("servers = ['127.0.0.1:1', '127.0.0.1:1']", "listed twice"),
        ("servers = ['127.0.0.1:1']\npolicy = 'fastest'", "unknown policy 'fastest'"),
        ("servers = ['127.0.0.1:1']\npolicy = 'hash'", "needs a hash_key"),
        ("servers = ['127.0.0.1:1']\nhash_key = 'body:x'", "hash_key"),
        ("servers = ['127.0.0.1:1']\nretry = {on = ['sometimes']}", "sometimes"),
        ("servers = [{address = '127.0.0.1:1', weight = 0}]", "weight"),
        ("servers = ['127.0.0.1:1']\nkeep_alive = 3", "keep_alive"),
        # Checked at load as the cookie is built (`webtorch check` said OK; serving crashed).
        ("servers = ['127.0.0.1:1']\nsticky = {cookie = 'my route'}", "sticky: .*cookie name"),
        ("servers = ['127.0.0.1:1']\nsticky = {samesite = 'none'}", "sticky: .*requires secure"),
        ("servers = ['127.0.0.1:1']\nsticky = {expires = inf}", "sticky: .*expires"),
    ],
)
def test_bad_upstreams_name_the_key(upstream: str, message: str) -> None:
    text = f"[upstreams.backend]\n{upstream}\n"
    with pytest.raises(ConfigError, match=message):
        wt_config.from_dict(tomllib.loads(text))


def test_a_route_to_an_unknown_upstream_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"routes\.0\.upstream|no upstream named 'nope'"):
        wt_config.from_dict({"routes": [{"prefix": "/", "upstream": "nope"}]})


def test_untrusted_proxy_list_entries_are_refused() -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        wt_config.from_dict({"server": {"trusted_proxies": ["not-an-ip"]}})


# -- policies' settings: what a policy reads is what a config can set ---------------------------


def test_every_setting_of_the_learned_policy_can_be_set_from_the_config(tmp_path: Path) -> None:
    # Issue 20: learned read decay_time and initial_latency from a dict of its section, with
    # defaults of its own, while [upstreams.X.learned] refused both as unknown keys.
    import asyncio

    from webtorch.balance.learned import Learned
    from webtorch.proxy.upstream import UpstreamGroup

    values: dict[str, object] = {
        "explore": 0.5,
        "explore_margin": 3.0,
        "sample": 4,
        "warm_keys": 2,
        "key_balance": 0.5,
        "batch": 3,
        "train_interval": 2.0,
        "failure_cost": 4.0,
        "decay_time": 2.5,
        "initial_latency": 0.25,
    }
    cfg = wt_config.from_dict(
        {
            "upstreams": {
                "g": {
                    "servers": ["127.0.0.1:1", "127.0.0.1:2"],
                    "policy": "learned",
                    "learned": {**values, "hidden": 8, "learning_rate": 0.5, "state_dir": "st"},
                }
            }
        }
    )
    loop = asyncio.new_event_loop()
    try:
        group = UpstreamGroup("g", cfg.upstreams["g"], loop, base_dir=tmp_path)
        policy = group.policy
        assert isinstance(policy, Learned)
        assert {key: getattr(policy, key) for key in values} == values
        assert policy.net.hidden.out_features == 8
        assert policy.optimizer.param_groups[0]["lr"] == 0.5
        assert policy.state_dir == tmp_path / "st"
        # The peak-EWMA priors it scores with follow the two settings it could not be given.
        estimate = policy.group[0].stats["learned"].latency  # type: ignore[attr-defined]
        assert (estimate.decay_time, estimate.value) == (2.5, 0.25)
        group.close()
    finally:
        loop.close()


def test_each_policys_section_is_its_own_settings_class() -> None:
    from webtorch.balance.registry import POLICIES
    from webtorch.balance.settings import SETTINGS

    fields = wt_config.UpstreamConfig.model_fields
    for name, kind in SETTINGS.items():
        assert name in POLICIES
        assert fields[name].annotation is kind, name
        assert fields[name].default_factory is kind, name
    cfg = wt_config.from_dict({"upstreams": {"g": {"servers": ["127.0.0.1:1"]}}})
    assert cfg.upstreams["g"].policy_settings() is None  # round_robin has none
    with pytest.raises(ConfigError, match="decay_time"):
        wt_config.from_dict(
            {"upstreams": {"g": {"servers": ["127.0.0.1:1"], "learned": {"decay_time": 0}}}}
        )
    with pytest.raises(ConfigError, match="probe_path"):
        wt_config.from_dict(
            {"upstreams": {"g": {"servers": ["127.0.0.1:1"], "prequal": {"probe_path": "/a b"}}}}
        )

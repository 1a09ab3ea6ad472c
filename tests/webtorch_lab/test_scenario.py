"""Scenario files, the balancers' generated configs, and the shipped scenarios."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest

from webtorch import config
from webtorch.errors import ConfigError
from webtorch_lab import balancers
from webtorch_lab import scenario as scenarios
from webtorch_lab.cli import parse_balancers

BASE = {
    "duration": 10.0,
    "load": {"rate": 100.0, "keys": 4},
    "upstreams": [
        {"name": "fast", "count": 3, "slots": 4, "service": {"median": 0.01, "p99": 0.05}},
        {
            "name": "slow",
            "slots": 4,
            "service": {"dist": "fixed", "median": 0.01},
            "faults": [{"kind": "delay", "start": 2.0, "end": 6.0, "delay": 2.0}],
        },
    ],
    "balancers": ["webtorch:round_robin", "nginx:hash", {"kind": "webtorch", "policy": "hash"}],
}


def test_parse_and_names() -> None:
    s = scenarios.from_dict(BASE, "x.toml", "x")
    assert s.name == "x"
    assert s.upstream_names() == ["fast-0", "fast-1", "fast-2", "slow"]
    assert [b.name for b in s.balancers] == ["webtorch:round_robin", "nginx:hash", "webtorch:hash"]
    assert s.load.method == "GET"
    shares = s.fair_shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["fast-0"] == pytest.approx(shares["fast-1"])
    ((name, fault),) = s.fault_windows(scale=0.5)
    assert name == "slow" and (fault.start, fault.end) == (1.0, 3.0)
    assert s.params(0.5)[3].faults.at(1.5).delay == 2.0


def test_errors_name_the_key() -> None:
    bad = {**BASE, "load": {"rate": -1}}
    with pytest.raises(ConfigError, match=r"load.rate"):
        scenarios.from_dict(bad, "bad.toml")
    with pytest.raises(ConfigError, match="unknown; nginx variants"):
        scenarios.from_dict({**BASE, "balancers": ["nginx:magic"]}, "bad.toml")
    with pytest.raises(ConfigError, match="webtorch:POLICY"):
        scenarios.from_dict({**BASE, "balancers": ["haproxy:rr"]}, "bad.toml")
    with pytest.raises(ConfigError, match="extra_key"):
        scenarios.from_dict({**BASE, "extra_key": 1}, "bad.toml")
    fault = {"kind": "slow", "start": 3.0, "end": 2.0, "factor": 2.0}
    with pytest.raises(ConfigError, match="end comes after"):
        scenarios.from_dict({**BASE, "upstreams": [{"faults": [fault]}]}, "bad.toml")


def test_any_webtorch_policy_name_is_accepted_by_the_scenario() -> None:
    specs = parse_balancers("future_policy, nginx:least_conn")
    assert [(s.kind, s.policy) for s in specs] == [
        ("webtorch", "future_policy"),
        ("nginx", "least_conn"),
    ]


def test_webtorch_config_is_valid(tmp_path: Path) -> None:
    s = scenarios.from_dict({**BASE, "webtorch": {"outlier": {"consecutive_5xx": 0}}}, "x")
    ports = {name: 20000 + i for i, name in enumerate(s.upstream_names())}
    for spec in s.balancers:
        if spec.kind != "webtorch":
            continue
        path = tmp_path / f"{spec.policy}.toml"
        path.write_text(balancers.webtorch_config(s, spec, ports))
        assert balancers.webtorch_problem(path) is None
        cfg = config.load(path)
        group = cfg.upstreams["lab"]
        assert group.policy == spec.policy
        assert group.hash_key == "header:x-key"
        assert group.outlier.consecutive_5xx == 0
        assert group.read_timeout == s.proxy.read_timeout
        assert len(group.servers) == 4
    unknown = scenarios.BalancerSpec(kind="webtorch", policy="no_such_policy")
    path = tmp_path / "unknown.toml"
    path.write_text(balancers.webtorch_config(s, unknown, ports))
    problem = balancers.webtorch_problem(path)
    assert problem is not None and "no_such_policy" in problem


def test_toml_values() -> None:
    assert (
        balancers.toml_value({"a": [1, 2.5, "x"], "b": True}) == '{ a = [1, 2.5, "x"], b = true }'
    )
    assert balancers.toml_value(math.inf) == "inf"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
@pytest.mark.parametrize("variant", scenarios.NGINX_VARIANTS)
def test_nginx_config_is_valid(tmp_path: Path, variant: str) -> None:
    s = scenarios.from_dict(BASE, "x")
    spec = scenarios.BalancerSpec(kind="nginx", policy=variant)
    ports = {name: 20000 + i for i, name in enumerate(s.upstream_names())}
    conf = tmp_path / "nginx.conf"
    conf.write_text(balancers.nginx_config(s, spec, ports, 20100, tmp_path))
    argv = [*balancers.nginx_argv(conf, tmp_path), "-t", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_shipped_scenarios_load() -> None:
    shipped = scenarios.shipped()
    assert len(shipped) >= 8
    for path in shipped:
        s = scenarios.load(path)
        assert s.description, path
        assert s.name == path.stem
    assert scenarios.find("slow-node").stem == "slow-node"
    with pytest.raises(ConfigError, match="shipped"):
        scenarios.find("no-such-scenario")

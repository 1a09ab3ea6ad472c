"""The generator and the simulated upstreams over real sockets, in one event loop: what is sent
when, and what gets recorded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import uvloop

from webtorch_lab import scenario as scenarios
from webtorch_lab.generator import Generator, request_head, scenario_plan
from webtorch_lab.records import Records
from webtorch_lab.schedule import Planned
from webtorch_lab.sim import SimHost


def make(**load: object) -> scenarios.Scenario:
    return scenarios.from_dict(
        {
            "name": "t",
            "duration": 1.0,
            "warmup": 0.0,
            "load": {"rate": 100.0, "timeout": 0.3, **load},
            "upstreams": [
                {
                    "name": "u",
                    "slots": 2,
                    "service": {"dist": "fixed", "median": 0.002},
                    "faults": [{"kind": "blackhole", "start": 0.5, "end": 10.0}],
                }
            ],
        },
        "test",
    )


def run_against_sim(scenario: scenarios.Scenario, planned: list[Planned]) -> tuple[Generator, dict]:  # type: ignore[type-arg]
    async def main() -> tuple[Generator, dict]:  # type: ignore[type-arg]
        host = SimHost()
        ports = await host.up(scenario, 1.0, 1)
        t0 = time.monotonic() + 0.05
        host.start(t0)
        load = scenario.load
        generator = Generator(
            planned, ports["u"], t0, load.timeout, load.method, load.path, load.key_header
        )
        await generator.run()
        return generator, await host.stop()

    return uvloop.run(main())


def test_request_head() -> None:
    assert (
        request_head("GET", "/work", "x-key", None, 0) == b"GET /work HTTP/1.1\r\nhost: lab\r\n\r\n"
    )
    head = request_head("POST", "/work", "x-key", "key-01", 5)
    assert b"x-key: key-01\r\n" in head and b"content-length: 5\r\n" in head


def test_records_answers_and_timeouts(tmp_path: Path) -> None:
    scenario = make(keys=3, sizes=[{"bytes": 100}])
    planned = [
        Planned(0.0, "key-00", 100),
        Planned(0.1, "key-01", 100),
        Planned(0.2, "key-02", 100),
        Planned(0.6, "key-00", 100),  # into the black hole: times out
    ]
    generator, stats = run_against_sim(scenario, planned)
    records = generator.records()
    records.write(tmp_path / "r.csv")
    rows = Records.read(tmp_path / "r.csv").rows
    assert [r.outcome for r in rows] == ["ok", "ok", "ok", "timeout"]
    assert [r.upstream for r in rows] == ["u", "u", "u", ""]
    assert [r.key for r in rows] == ["key-00", "key-01", "key-02", "key-00"]
    assert all(r.size == 100 for r in rows)
    assert rows[0].status == 200 and rows[3].status == 0
    assert all(0.001 < r.latency < 0.3 for r in rows[:3])
    assert rows[3].latency == 0.3
    assert all(r.lag >= 0 for r in rows)
    # the upstream saw four requests and held the last one
    assert stats["u"]["requests"] == 4 and stats["u"]["held"] == 1
    assert generator.summary()["requests"] == 4


def test_opens_connections_instead_of_waiting(tmp_path: Path) -> None:
    """Open loop: requests due while others are held each get a connection of their own."""
    scenario = make()
    planned = [Planned(0.6 + i * 0.001, None, 0) for i in range(20)]
    generator, _ = run_against_sim(scenario, planned)
    assert generator.max_open >= 20
    assert [r.outcome for r in generator.records().rows] == ["timeout"] * 20


def test_scenario_plan_scales_the_duration() -> None:
    scenario = make()
    assert len(scenario_plan(scenario, 2.0, 1)) > len(scenario_plan(scenario, 1.0, 1))
    assert all(p.t < 1.0 for p in scenario_plan(scenario, 1.0, 1))


def test_down_refuses_connections() -> None:
    scenario = scenarios.from_dict(
        {
            "duration": 1.0,
            "warmup": 0.0,
            "load": {"rate": 100.0, "timeout": 0.3},
            "upstreams": [{"name": "u", "faults": [{"kind": "down", "start": 0.2, "end": 0.5}]}],
        },
        "test",
    )
    planned = [Planned(0.0, None, 0), Planned(0.3, None, 0), Planned(0.7, None, 0)]
    generator, _ = run_against_sim(scenario, planned)
    assert [r.outcome for r in generator.records().rows] == ["ok", "error", "ok"]


def test_health_and_probe_are_not_counted() -> None:
    scenario = make()

    async def main() -> dict:  # type: ignore[type-arg]
        host = SimHost()
        port = (await host.up(scenario, 1.0, 1))["u"]
        host.start(time.monotonic())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /v2/health/load HTTP/1.1\r\n\r\n")
        first = await reader.readuntil(b'{"status":"ok"}')
        second = await reader.readuntil(b"}")
        writer.close()
        assert b"200 OK" in first and b'"inflight":0' in second
        return await host.stop()

    assert uvloop.run(main())["u"]["requests"] == 0

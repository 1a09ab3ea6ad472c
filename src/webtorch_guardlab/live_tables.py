"""The tables of ``webtorch guard eval --live`` (``live.py`` measures, this writes it up)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from webtorch.config import GuardConfig
from webtorch_guardlab.live import (
    BENIGN_BLOCK,
    FLOOD_BLOCK,
    LIVE_HEADING,
    LOAD_CORE,
    SCRAPER,
    SERVER_CORE,
    BenignStats,
    LiveResults,
)


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"


def _pct(share: float) -> str:
    return "-" if share != share else f"{share * 100:.1f}%"


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f}"


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _decided(decided: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(decided.items())) or "-"


def _failures(stats: BenignStats) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(stats.statuses.items())) or "-"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def report(results: LiveResults, command: str) -> str:
    """The ``## Live attacks`` section of GUARD_RESULTS.md."""
    s = results.settings
    mix = results.mix
    lo, hi = s.benign_rate
    out = [
        LIVE_HEADING,
        "",
        f"Command: `{command}` ({results.seconds:.0f} s, {time.strftime('%Y-%m-%d')})",
        "",
        "Machine: 2 cores, shared and noisy (the same nginx gave 22k and 89k req/s an hour apart):"
        " compare the configs within one table of this run, not with other runs. "
        + (
            f"`webtorch serve` pinned to core {SERVER_CORE} (taskset), every load generator and "
            f"attack tool to core {LOAD_CORE}."
            if results.pinned
            else "Nothing was pinned (no taskset or no second core)."
        ),
        "",
        "Configs (one fresh server per scenario and config):",
        "",
        "- **none**: no `[guard]`; the server's default limits (header_timeout 10 s, "
        "body_timeout 60 s, keepalive_timeout 75 s).",
        f"- **bucket** (nginx `limit_req rate={s.rate:g}r/s burst={s.burst:g} nodelay`, "
        f'`limit_conn {s.max_connections}`, shorter timeouts): `[guard] mode = "enforce", '
        f'model = "none", rate = {s.rate:g}, burst = {s.burst:g}, '
        f"max_connections = {s.max_connections}`; `[server.limits] header_timeout = "
        f"{s.header_timeout:g}, body_timeout = {s.body_timeout:g}`. The rate is 4x a benign "
        f"client's highest ({hi:g}/s) and the burst two seconds of it: what an operator sets for "
        "this load.",
        "- **guard**: the same plus the shipped detector (its default thresholds: throttle "
        f"{GuardConfig().throttle:g}, block {GuardConfig().block:g}; "
        f"ban_seconds {s.ban_seconds:g}) and the surge defence (`surge_rate = "
        f"{s.surge_rate:g}`, `surge_min_rate = {s.surge_min_rate:g}`, `surge_factor = "
        f"{GuardConfig().surge_factor:g}`: while the server's whole rate is above both, a client "
        "first seen within 1 s before the surge or during it gets that many requests/s).",
        f"- The harness's own scraper ({SCRAPER}: /metrics every 0.25 s, health) is allow-listed.",
        "",
        f"Benign load: {s.benign_clients} clients, each its own address (127.{BENIGN_BLOCK}.0.x),"
        f" each at its own Poisson rate in [{lo:g}, {hi:g}] req/s (open loop, up to 4 keep-alive "
        "connections per client, latency from the intended send time). The mix: half POST "
        "/models/xor/predict (1-4 rows), GET / (a fixed route), GET /v2/models/xor, health; 6 in "
        "7 carry a query string (session ids, paging, search words, utm tags, timestamps, a "
        "referrer URL), browser, curl, python-requests and tritonclient user agents, some "
        f"cookies. A benign request fails unless it gets a 2xx within {s.timeout:g} s.",
        "",
    ]
    if mix is not None:
        out += [
            f"The shipped detector on this mix (offline, each request from a fresh client): "
            f"{mix.blocked} of {mix.requests} requests score >= {GuardConfig().block:g} "
            "(blocked), "
            f"{mix.blocked_with_query} of them with a query string ({mix.with_query} of the "
            f"{mix.requests} have one; {mix.blocked - mix.blocked_with_query} blocked without); "
            f"{mix.throttled} more would be throttled. Blocked / requests by the query's first "
            "parameter: "
            + ", ".join(f"`{param}` {hit}/{n}" for param, (hit, n) in sorted(mix.by_param.items()))
            + ". These false positives are the benign 403s in the full guard's rows below.",
            "",
        ]
    out += _flood_section(results)
    out += _tool_sections(results)
    out += _cost_section(results)
    out += _goals(results)
    if results.notes:
        out += ["Notes:", "", *(f"- {n}" for n in results.notes), ""]
    return "\n".join(out).rstrip() + "\n"


def _flood_section(results: LiveResults) -> list[str]:
    s = results.settings
    if not results.floods:
        return []
    out = [
        "### HTTP keep-alive flood",
        "",
        f"{s.flood_addresses} addresses (127.{FLOOD_BLOCK}.x.y) x {s.flood_per_address} "
        "keep-alive connections, each sending its next request as soon as the last is answered "
        "(Retry-After ignored; a connection the server closes is opened again at once), the same "
        f"request mix as the benign clients, from t = {s.flood_start:g} s for "
        f"{s.flood_duration:g} s, while the benign clients keep asking (the flood's process at "
        "nice 10 on the load core, so the benign clients are not starved by it). Control: the "
        f"benign clients alone for {s.control:g} s on the same server just before.",
        "",
        "Benign clients:",
        "",
    ]
    rows: list[list[object]] = []
    for r in results.floods:
        rows.append(
            [
                r.config,
                _pct(r.control.success),
                f"{_ms(r.control.p50)} / {_ms(r.control.p99)}",
                _pct(r.during.success),
                f"{_ms(r.during.p50)} / {_ms(r.during.p99)}",
                f"{r.during.requests:,}",
                _failures(r.during),
                _pct(r.after.success),
            ]
        )
    out += _table(
        [
            "config",
            "control ok",
            "control p50 / p99 ms",
            "during flood ok",
            "during p50 / p99 ms",
            "requests",
            "failures during",
            "after flood ok",
        ],
        rows,
    )
    out += ["", "The flood:", ""]
    rows = []
    for r in results.floods:
        f = r.flood
        rows.append(
            [
                r.config,
                _s(f.first_throttle),
                _n(f.served_before_throttle),
                _s(f.first_refusal),
                _n(f.served_before),
                _s(f.refused90),
                f"{f.served_per_s:,.0f}",
                f"{f.attempts_per_s:,.0f}",
                _pct(f.refused_share),
                _decided(r.decisions),
            ]
        )
    out += _table(
        [
            "config",
            "first 429 or refused connection (s)",
            "attacker 2xx before it",
            "first refusal of any kind (s)",
            "attacker 2xx before it",
            ">= 90% refused for 0.5 s from (s)",
            "attacker 2xx/s",
            "attacker answers/s",
            "refused",
            "guard decisions (all clients)",
        ],
        rows,
    )
    out += [
        "",
        "Times are from the flood's start. With a per-address bucket each flooding address gets "
        f"its burst ({s.burst:g}) and then {s.rate:g}/s: {s.flood_addresses} addresses keep "
        f"{s.flood_addresses * s.rate:,.0f} req/s of the flood served however fast they send, "
        "and the first 429 comes after burst / (the address's rate - the bucket's rate) "
        "seconds, so a flood spread thinner is throttled later, or never. The flood is as fast "
        "as a Python generator on one core gets, about half of what the server's core can "
        "answer (see the cost section), so even undefended the server keeps up here; what a "
        "defence buys shows in the attacker's 2xx/s rather than in the benign latency.",
        "",
    ]
    return out


def _tool_sections(results: LiveResults) -> list[str]:
    s = results.settings
    out: list[str] = []
    gold = [t for t in results.tools if t.tool == "goldeneye"]
    if gold:
        out += [
            "### goldeneye (Debian)",
            "",
            f"`goldeneye URL -w {s.goldeneye_workers} -s {s.goldeneye_sockets} -m random` for "
            f"{s.goldeneye:g} s (then its process group is killed), benign clients alongside. "
            "Debian's build fails every request on Python >= 3.10 "
            "(`random.randint(1, len(acceptEncoding)/2)` with a float), so a copy with that "
            "division made `//` is run; nothing else changed. It sends from one address "
            "(127.0.0.1, it cannot bind others), opens new connections in batches "
            f"({s.goldeneye_workers} workers x {s.goldeneye_sockets}, a list that grows every "
            "round), random query strings, user agents and headers. What it got is counted from "
            "the server's /metrics (its total minus the benign clients' own answers), the first "
            "refusal to a 0.25 s scrape.",
            "",
        ]
        out += _table(
            [
                "config",
                "benign ok",
                "benign p50 / p99 ms",
                "benign failures",
                "attacker 2xx",
                "attacker refused",
                "first refusal (s)",
                "attacker 2xx before it",
                "server connections, peak",
                "guard decisions",
                "goldeneye's own count",
            ],
            [
                [
                    t.config,
                    _pct(t.benign.success),
                    f"{_ms(t.benign.p50)} / {_ms(t.benign.p99)}",
                    _failures(t.benign),
                    f"{t.attacker_ok:,}",
                    f"{t.attacker_refused:,}",
                    _s(t.first_refusal),
                    _n(t.served_before),
                    f"{t.peak_connections:,}",
                    _decided(t.decisions),
                    t.note,
                ]
                for t in gold
            ],
        )
        out.append("")
    slow = [t for t in results.tools if t.tool != "goldeneye"]
    if slow:
        out += [
            "### Slow attacks (Debian slowhttptest)",
            "",
            f"`slowhttptest -H` (slowloris) and `-B` (slow POST, Content-Length 8192) with "
            f"`-c {s.slow_connections} -r {s.slow_rate} -i {s.slow_interval}` for "
            f"{s.slow_duration:g} s, from 127.0.0.1, benign clients alongside. Server "
            "connections: the server's open connections (its gauge, scraped every 0.25 s). "
            "Responsive: a health check answered after the attack.",
            "",
        ]
        out += _table(
            [
                "attack",
                "config",
                "benign ok",
                "benign p50 / p99 ms",
                "benign failures",
                "server connections, peak",
                "attacker connections refused",
                "responsive",
                "slowhttptest's view",
                "guard decisions",
            ],
            [
                [
                    t.tool,
                    t.config,
                    _pct(t.benign.success),
                    f"{_ms(t.benign.p50)} / {_ms(t.benign.p99)}",
                    _failures(t.benign),
                    f"{t.peak_connections:,}",
                    f"{t.attacker_refused:,}",
                    "yes" if t.responsive else "**no**",
                    t.note,
                    _decided(t.decisions),
                ]
                for t in slow
            ],
        )
        out += [
            "",
            "Both tools attack from one address, so the per-address connection cap refuses all "
            f"but {s.max_connections} of their connections at accept. An asyncio server holds "
            "1,000 idle connections without trouble either way; against a slow attack from many "
            "addresses the per-address cap does nothing and the header and body timeouts are "
            "what bound it.",
            "",
        ]
    return out


def _cost_section(results: LiveResults) -> list[str]:
    s = results.settings
    if not results.costs:
        return []
    configs = list(dict.fromkeys(c.config for c in results.costs))
    out = [
        "### Guard cost",
        "",
        f"Open loop: {s.cost_rate:,.0f} req/s (Poisson arrivals) of the benign mix over one "
        f"keep-alive connection per address from {s.cost_addresses} addresses "
        f"({s.cost_rate / s.cost_addresses:g} req/s each, under the bucket's rate) for "
        f"{s.cost_duration:g} s; latency from the intended send time; server CPU (utime + stime "
        "from /proc) per request answered. Saturation: closed loop, "
        f"{s.saturation_addresses:,} addresses x 1 keep-alive connection, each sending as soon "
        f"as answered, {s.saturation_duration:g} s measured after 1 s. The generator is Python "
        "on one core and cannot always fill the server's core ('server core busy' < 100%), so "
        "the server's capacity is given as answers per second of its CPU (what one full core "
        "would answer), beside the answers/s measured. 'monitor' is the full guard in monitor "
        "mode: every request scored and decided, none refused, so the handler runs for every "
        "request as in 'none'; the enforcing guard answers its false positives with a 403 "
        f"instead (cheaper than a prediction). Every config has its own server, all started "
        f"together and measured in turn ({', '.join(configs)}), {s.cost_rounds} rounds, "
        "after a 1 s warm-up each. The wrk of the design notes is not used: it sends from one "
        "address, which the bucket would throttle. The surge defence is off here: the "
        "saturation run (thousands of new addresses at full speed) is a surge by its "
        "definition, and refusing it would price 429s, not the scoring of benign traffic.",
        "",
    ]
    out += _table(
        [
            "config",
            "round",
            "open-loop p50 / p99 ms",
            "refused (monitor: would refuse)",
            "server CPU us/request, open loop",
            "saturation answers/s (2xx/s)",
            "server core busy",
            "server CPU us/answer",
            "capacity: answers per CPU second",
        ],
        [
            [
                c.config,
                c.round,
                f"{c.moderate.p50 * 1000:.3f} / {c.moderate.p99 * 1000:.3f}",
                f"{c.refused:,}",
                f"{c.cpu_us:.1f}",
                f"{c.saturation_answers:,.0f} ({c.saturation_rps:,.0f})",
                _pct(c.saturation_util),
                f"{c.saturation_cpu_us:.1f}",
                f"{c.capacity:,.0f}",
            ]
            for c in results.costs
        ],
    )
    out += ["", "Against `none` in the same round (mean over rounds, range in brackets):", ""]
    rows = []
    for config, deltas in cost_deltas(results).items():
        rows.append(
            [
                config,
                _range(deltas["p50_us"], "{:+.0f}"),
                _range(deltas["p99_us"], "{:+.0f}"),
                _range(deltas["cpu_us"], "{:+.1f}"),
                _range(deltas["sat_cpu_us"], "{:+.1f}"),
                _range(deltas["capacity"], "{:.3f}"),
                _range(deltas["measured"], "{:.3f}"),
            ]
        )
    out += _table(
        [
            "config",
            "added p50 us",
            "added p99 us",
            "added CPU us/request, open loop",
            "added CPU us/answer, saturation",
            "capacity ratio",
            "measured answers/s ratio",
        ],
        rows,
    )
    if results.check_us:
        out += [
            "",
            "`Guard.check` alone, in-process on the server's core (the benign mix from 200 "
            "clients, no network, no server): "
            + ", ".join(f"{k} {v:.1f} us" for k, v in results.check_us.items())
            + " per request. The rest of the added CPU above is the guard's I/O shell (the "
            "request view, the connection gate, the answer observer) and the run's noise. The "
            "added open-loop latency is larger than the added CPU per request; this harness does "
            "not say why.",
        ]
    out.append("")
    return out


def _range(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def cost_deltas(results: LiveResults) -> dict[str, dict[str, list[float]]]:
    """Per config other than none: its differences from none in the same round."""
    base = {c.round: c for c in results.costs if c.config == "none"}
    out: dict[str, dict[str, list[float]]] = {}
    for c in results.costs:
        ref = base.get(c.round)
        if c.config == "none" or ref is None:
            continue
        d = out.setdefault(c.config, {})
        for key, value in (
            ("p50_us", (c.moderate.p50 - ref.moderate.p50) * 1e6),
            ("p99_us", (c.moderate.p99 - ref.moderate.p99) * 1e6),
            ("cpu_us", c.cpu_us - ref.cpu_us),
            ("sat_cpu_us", c.saturation_cpu_us - ref.saturation_cpu_us),
            ("capacity", c.capacity / max(ref.capacity, 1e-9)),
            ("measured", c.saturation_answers / max(ref.saturation_answers, 1e-9)),
        ):
            d.setdefault(key, []).append(value)
    return out


def _unanswered(stats: BenignStats) -> float:
    """The share of requests that got no answer at all (timeouts, resets)."""
    lost = stats.statuses.get("timeout", 0) + stats.statuses.get("no answer", 0)
    return lost / stats.requests if stats.requests else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _goals(results: LiveResults) -> list[str]:
    out = ["### Goals", ""]
    for r in results.floods:
        if r.config == "none":
            continue
        f = r.flood
        throttled = f.first_throttle is not None and f.first_throttle <= 1.0
        out.append(
            f"- Flood throttled within 1 s ({r.config}): "
            + ("met" if throttled else "**not met**")
            + f" (first 429 at {_s(f.first_throttle)} s; >= 90% of the flood refused: "
            + (f"from {f.refused90:.2f} s" if f.refused90 is not None else "never")
            + f"; {f.served_per_s:,.0f} attacker req/s still served). "
            f"Benign >= 99% during it: "
            + ("met" if r.during.success >= 0.99 else "**not met**")
            + f" ({_pct(r.during.success)})."
        )
    slow = [t for t in results.tools if t.tool != "goldeneye"]
    if slow:
        # Exhausted: unresponsive, or benign requests unanswered (the detector's 403s are
        # answers, and counted against it in the other goals).
        bad = [t for t in slow if not t.responsive or _unanswered(t.benign) > 0.01]
        refused = [t for t in slow if t.benign.success < 0.99 and t not in bad]
        out.append(
            "- Slowloris and slow POST never exhaust the server: "
            + (
                "met (responsive in every config, every benign request answered"
                + (
                    "; the full guard's benign failures are its detector's 403s"
                    if refused
                    else ", >= 99% with a 2xx"
                )
                + ")"
                if not bad
                else "**not met** for " + ", ".join(f"{t.tool}/{t.config}" for t in bad)
            )
            + "."
        )
    deltas = cost_deltas(results)
    for config in ("guard", "monitor", "bucket"):
        d = deltas.get(config)
        if d is None:
            continue
        p50, cpu = _mean(d["p50_us"]), _mean(d["sat_cpu_us"])
        ratio = _mean(d["capacity"])
        out.append(
            f"- Cost <= 20 us per request at p50 ({config}): "
            + ("met" if p50 <= 20 and cpu <= 20 else "**not met**")
            + f" (added p50 latency {p50:+.0f} us, added server CPU {cpu:+.1f} us per answer at"
            " saturation); <= 10% throughput: "
            + ("met" if ratio >= 0.9 else "**not met**")
            + f" (capacity {ratio:.3f}x none's)."
        )
    out.append("")
    return out

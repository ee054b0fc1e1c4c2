"""Overload: offered load at 3× the gateway's ceiling (N = 4, zero-latency upstreams), open loop. What a gateway
with admission control should show: goodput near its ceiling, admitted requests' p99 not far above its value at
75 % load, the rest refused at once with 503 + Retry-After, and memory that stays flat."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import promtext
from bench.harness import Bench, Goal
from bench.procs import listen_overflows
from bench.variants import VARIANTS, Variant, aggregate_body, has_setting, upstream_names

N = 4
GOODPUT_GOAL = 0.9
P99_FACTOR_GOAL = 2.0
SHED_GOAL_MS = 50.0
SHED_AIM_MS = 5.0  # what a refusal should cost; the goal leaves room for a shared machine
FLAT_MB = 20.0  # growth over the second half of the run that still counts as flat
SHED = "gateway_http_requests_shed_total"
ADAPTIVE_LAG_MS = 20.0  # limits.shed_loop_lag_ms of the second 3× run


@dataclass(frozen=True)
class Mode:
    """How the generator holds its connections."""

    key: str
    label: str
    connections: int  # the most open at once
    fresh: bool  # a connection per request


MODES = (
    # A balancer's pool: keep-alive, a new connection only when every open one is busy, up to a cap.
    Mode("pool", "keep-alive pool (as a balancer)", 256, False),
    # Clients without a pool: connect, one request, close; at most this many at once (file descriptors).
    Mode("fresh", "fresh connection per request", 2048, True),
)


def _three_x(bench: Bench, gateway: Variant, body: Path, offered: float, mode: Mode) -> dict[str, Any]:
    """One open-loop run at ``offered`` req/s, with the gateway's RSS and admission limit sampled meanwhile."""
    p = bench.profile
    before = bench.scrape(gateway)
    argv = bench.loadgen_argv(
        gateway.url + "/aggregate",
        body,
        seconds=p.overload_s,
        rate=offered,
        warmup=0.5,
        connections=mode.connections,
        grace=10.0,
        fresh=mode.fresh,
    )
    rss: list[tuple[float, float]] = []
    admitting: list[int] = []  # the admission limit, every 0.5 s (in builds whose limit follows the loop's lag)
    started = time.monotonic()
    cpu_before, core_before = gateway.service.cpu_seconds(), bench.pinning.server_busy_s()
    overflows_before = listen_overflows()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while True:
        try:
            out, err = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if gateway.service.alive():
                rss.append((round(time.monotonic() - started, 2), gateway.service.rss_bytes() / 2**20))
                now = bench.scrape(gateway)
                limit = None if now is None else promtext.value(now, "gateway_http_admission_limit")
                if limit is not None:
                    admitting.append(int(limit))
            if time.monotonic() - started > p.overload_s + 120:
                proc.kill()
                out, err = proc.communicate()
                break
    cpu_used = gateway.service.cpu_seconds() - cpu_before
    run_s = time.monotonic() - started
    others_s = max(0.0, bench.pinning.server_busy_s() - core_before - cpu_used)
    overflows = listen_overflows() - overflows_before
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-2000:]}")
    over: dict[str, Any] = json.loads(out)
    over.update(bench.gateway_window(gateway, before))
    after = bench.scrape(gateway)
    if before is not None and after is not None:
        over["shed_by_reason"] = {
            reason: int(
                (promtext.value(after, SHED, reason=reason) or 0) - (promtext.value(before, SHED, reason=reason) or 0)
            )
            for reason in ("in_flight", "loop_lag")
        }
    answers = max(1, over["completed"] + over["warmup_done"])
    measured = [m for t, m in rss if 0.5 <= t <= p.overload_s + 0.5]
    half = measured[len(measured) // 2 :] or measured
    return {
        "mode": mode.key,
        "over": over,
        "rss": rss,
        "rss_growth_second_half_mb": (max(half) - half[0]) if half else None,
        "rss_range_mb": (measured[0], measured[-1]) if measured else None,
        "admitting": admitting,
        "core_share": round(cpu_used / run_s, 2) if run_s > 0 else 0.0,
        "cpu_us_per_answer": round(cpu_used / answers * 1e6, 1),
        "others_on_server_cpu": round(others_s / run_s, 2) if run_s > 0 else 0.0,
        "listen_overflows": overflows,
    }


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    # The admission limit (in builds that have one) at twice the concurrency the ceiling is measured with: enough
    # to reach the ceiling and ride out bursts at 75 %, little queueing beyond it.
    limits = {"max_in_flight_requests": 2 * p.connections} if has_setting("limits.max_in_flight_requests") else {}
    gateway = bench.start([VARIANTS["gateway"]], upstream_names(N, bench.upstream(0)), tag="-overload", limits=limits)[
        "gateway"
    ]
    body = bench.body_file("overload", aggregate_body(N))
    bench.closed(gateway, body, seconds=p.warmup_s)
    ceiling = statistics.median(bench.closed(gateway, body, seconds=p.ceiling_s)["rps"] for _ in range(p.rounds))
    offered = ceiling * 3
    modes: dict[str, Any] = {}
    for mode in MODES:
        base = bench.open(
            gateway, body, rate=ceiling * 0.75, seconds=p.open_s, connections=mode.connections, fresh=mode.fresh
        )
        p99 = base["latency_ok_us"]["p99"] / 1000
        bench.say(f"overload ({mode.key}): ceiling {ceiling:.0f} req/s; 75 %: p99 {p99:.1f} ms")
        bench.pause(1.0)
        modes[mode.key] = {"label": mode.label, "connections": mode.connections, "baseline_75": base}
        modes[mode.key].update(_three_x(bench, gateway, body, offered, mode))
        o = modes[mode.key]["over"]
        bench.say(
            f"overload ({mode.key}) 3×: goodput {o['goodput']:.0f} req/s, admitted p99 "
            f"{o['latency_ok_us']['p99'] / 1000:.1f} ms, 503 p99 {o['latency_503_us']['p99'] / 1000:.1f} ms, "
            f"listen overflows {modes[mode.key]['listen_overflows']}"
        )
        bench.pause(2.0)  # the backlog of one mode's run never spills into the next
    gateway.service.stop()
    adaptive: dict[str, Any] | None = None
    if limits and has_setting("limits.shed_loop_lag_ms"):
        # The same offered rate, through a balancer's pool, against a gateway whose limit follows its loop's lag
        # (off by default).
        tuned = {**limits, "shed_loop_lag_ms": ADAPTIVE_LAG_MS}
        second = bench.start(
            [VARIANTS["gateway"]], upstream_names(N, bench.upstream(0)), tag="-overload-lag", limits=tuned
        )["gateway"]
        bench.closed(second, body, seconds=p.warmup_s)
        adaptive = _three_x(bench, second, body, offered, MODES[0])
        second.service.stop()

    result: dict[str, Any] = {
        "n": N,
        "ceiling": ceiling,
        "admission_limit": limits.get("max_in_flight_requests"),
        "offered": round(offered, 1),
        "modes": modes,
        "adaptive": None
        if adaptive is None
        else {
            "shed_loop_lag_ms": ADAPTIVE_LAG_MS,
            "overload": adaptive["over"],
            "admission_limits": adaptive["admitting"],
            "listen_overflows": adaptive["listen_overflows"],
        },
    }
    for mode in MODES:
        goals(bench, result, mode)
    growth = {k: m["rss_growth_second_half_mb"] for k, m in modes.items()}
    measured_growth = {k: g for k, g in growth.items() if g is not None}
    bench.goals.append(
        Goal(
            "overload",
            f"memory flat (growth over the second half of each 3× run < {FLAT_MB:g} MB)",
            ", ".join(
                f"{k}: {g:+.1f} MB (RSS {modes[k]['rss_range_mb'][0]:.0f} → {modes[k]['rss_range_mb'][1]:.0f} MB)"
                for k, g in measured_growth.items()
            )
            or "n/a",
            all(g < FLAT_MB for g in measured_growth.values()) if measured_growth else None,
        )
    )
    return result


REMEDY = (
    "refuse the excess before any Python runs for it (a shorter listen backlog, so that the kernel holds or drops "
    "it) and admit fewer at once (a lower limits.max_in_flight_requests), so that a saturated loop spends its time "
    "on admitted work."
)


def goals(bench: Bench, result: dict[str, Any], mode: Mode) -> None:
    m = result["modes"][mode.key]
    over, base, ceiling = m["over"], m["baseline_75"], result["ceiling"]
    overflows = m["listen_overflows"]
    goodput = over["goodput"]
    shed = over["statuses"].get("503", 0)
    if shed:
        note_shed = ""
    elif result.get("admission_limit") is None:
        note_shed = "no request was shed: admission control is not available in this build"
    else:
        note_shed = (
            "no request was refused: the excess never reached the admission check (it waited in the kernel's "
            "listen queue or for a connection)"
        )
    p99_base = base["latency_ok_us"]["p99"] / 1000
    p99_over = over["latency_ok_us"]["p99"] / 1000
    shed_lat = over["latency_503_us"]
    connect_failed = sum(over["errors"].get(k, 0) for k in ("connect", "connect_timeout"))
    waiting = over["scheduled"] - over["sent"] - connect_failed
    starved = f"{waiting} requests never got one of the {mode.connections} connections" if waiting else ""
    tail = (
        f" Refusals took p50 {shed_lat['p50'] / 1000:.1f} ms and p90 {shed_lat['p90'] / 1000:.1f} ms; the kernel "
        f"dropped {overflows} connections from a full listen queue meanwhile ({over['connections_opened']} opened "
        f"by the generator, connect p99 {over['connect_us']['p99'] / 1000:.0f} ms), and a dropped handshake is "
        "retried after a second."
        if shed and overflows
        else ""
    )
    got = (
        "Its core was saturated"
        if m["core_share"] >= 0.9
        else f"It got {m['core_share']:.2f} of its core; other processes took {m['others_on_server_cpu']:.2f}"
    )
    saturated = (
        f"{got} ({m['cpu_us_per_answer']:.0f} µs CPU per answer, admitted or refused). Every refusal still "
        "costs the loop an HTTP parse, the admission check and a 503, on the same loop as the admitted requests, "
        "and waits its turn there."
    )
    why = note_shed or saturated
    ok_goodput = goodput >= GOODPUT_GOAL * ceiling
    ok_p99 = p99_over <= P99_FACTOR_GOAL * p99_base
    shed_p99 = shed_lat["p99"] / 1000
    ok_shed = shed_p99 < SHED_GOAL_MS if shed else None
    failures = f"; {connect_failed} connects failed or timed out" if connect_failed else ""
    bench.goals += [
        Goal(
            "overload",
            f"{mode.label}: goodput at 3× ceiling ≥ {GOODPUT_GOAL:.0%} of the ceiling",
            f"{goodput:.0f} req/s = {goodput / ceiling:.0%} of {ceiling:.0f}{failures}",
            ok_goodput,
            "" if ok_goodput else "; ".join(x for x in (why, starved) if x),
            "" if ok_goodput or not shed else REMEDY,
        ),
        Goal(
            "overload",
            f"{mode.label}: p99 of admitted requests ≤ {P99_FACTOR_GOAL:g}× its value at 75 % load",
            f"{p99_over:.1f} ms vs {p99_base:.1f} ms",
            ok_p99,
            "" if ok_p99 else why,
            "" if ok_p99 or not shed else REMEDY,
        ),
        Goal(
            "overload",
            f"{mode.label}: 503 p99 < {SHED_GOAL_MS:g} ms (aim {SHED_AIM_MS:g} ms)",
            f"p99 {shed_p99:.2f} ms, p50 {shed_lat['p50'] / 1000:.2f} ms ({shed} shed, "
            f"{over['retry_after_on_503']} with Retry-After; {overflows} listen-queue overflows)"
            if shed
            else "n/a",
            ok_shed,
            note_shed or ("" if ok_shed else saturated + tail),
            ""
            if not shed or ok_shed
            else REMEDY
            + (
                " Clients that keep their connections (a load balancer's pool) meet the listen queue only when "
                "their pool grows; for those that do not, a longer limits.listen_backlog trades drops for a longer "
                "accept burst."
                if overflows
                else ""
            ),
        ),
    ]


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    def row(mode: str, load: str, r: dict[str, Any], overflows: int | None) -> str:
        ok, shed = r["latency_ok_us"], r["latency_503_us"]
        connect_failed = sum(r["errors"].get(k, 0) for k in ("connect", "connect_timeout"))
        timeouts = r["errors"].get("connect_timeout", 0)
        errors = sum(r["errors"].values()) - connect_failed
        errors += sum(v for k, v in r["statuses"].items() if k not in ("200", "503"))
        return (
            f"| {mode} | {load} | {r['offered_rate']:.0f} | {r['goodput']:.0f} | {ok['p50'] / 1000:.1f} "
            f"| {ok['p99'] / 1000:.1f} | {r['statuses'].get('503', 0)} | {shed['p50'] / 1000:.2f} "
            f"| {shed['p99'] / 1000:.2f} | {r['connections_opened']} | {r['connect_us']['p99'] / 1000:.1f} "
            f"| {connect_failed} ({timeouts}) | {'–' if overflows is None else overflows} | {errors} "
            f"| {r.get('loop_lag_p99_ms', '–')} |"
        )

    modes: dict[str, Any] = result["modes"]
    any_mode = next(iter(modes.values()))
    lines = [
        f"## Overload (N = {result['n']}, zero-latency upstreams)",
        "",
        f"Ceiling {result['ceiling']:.0f} req/s (closed loop, keep-alive). Open loop at 75 % of it, then at 3× for "
        f"{any_mode['over']['duration_s']:g} s, in two connection modes: "
        + " and ".join(f"**{m['label']}** (at most {m['connections']} connections)" for m in modes.values())
        + ". The pool keeps its connections alive and opens one only when every open one is busy and a request is "
        "waiting, as a load balancer does; a fresh connection per request (connect, one request with `Connection: "
        "close`, close) puts the gateway's accept path and the kernel's listen queue on every request's way. "
        "Latency from intended send times (a request waiting for a connection or a connect is late, not "
        "unmeasured); connect p99 is the handshake alone. Listen-queue overflows: the kernel's count "
        "(TcpExt ListenOverflows, machine-wide) over the 3× run. "
        + (
            f"`limits.max_in_flight_requests = {result['admission_limit']}` (twice the concurrency the ceiling "
            "is measured with)."
            if result.get("admission_limit")
            else "This build has no admission limit setting."
        ),
        "",
        "| mode | load | offered req/s | goodput req/s | admitted p50 ms | admitted p99 ms | 503s | 503 p50 ms "
        "| 503 p99 ms | connections opened | connect p99 ms | connects failed (timed out) | listen overflows "
        "| other failures | loop lag p99 ms |",
        "|---" * 15 + "|",
    ]
    for key, m in modes.items():
        lines.append(row(key, "75 %", m["baseline_75"], None))
        lines.append(row(key, "3×", m["over"], m["listen_overflows"]))
    adaptive = result.get("adaptive")
    if adaptive:
        a = adaptive["overload"]
        lines.append(row("pool", f"3×, limit following lag > {adaptive['shed_loop_lag_ms']:g} ms", a, None))
    lines.append("")
    if adaptive:
        limits = adaptive["admission_limits"]
        by_reason = adaptive["overload"].get("shed_by_reason", {})
        lines += [
            "The last row is a second gateway, run right after the first at the same offered rate through a pool, "
            f"with `limits.shed_loop_lag_ms = {adaptive['shed_loop_lag_ms']:g}` (off by default): its in-flight "
            "limit drops while the loop lags. Its limit every 0.5 s: "
            + ", ".join(str(n) for n in limits[:: max(1, len(limits) // 12)])
            + f"; shed at the configured limit {by_reason.get('in_flight', 0)}, under the lowered one "
            f"{by_reason.get('loop_lag', 0)}; the kernel dropped {adaptive['listen_overflows']} connections from a "
            "full listen queue meanwhile. One run each, back to back: compare them within this run only.",
            "",
        ]
    for key, m in modes.items():
        rss = m["rss"]
        lines.append(
            f"During the 3× run ({key}) the gateway used {m['core_share']:.2f} of its core (other processes "
            f"{m['others_on_server_cpu']:.2f}), {m['cpu_us_per_answer']:.0f} µs CPU per answer (admitted or "
            "refused); its RSS every 0.5 s (MB): "
            + (", ".join(f"{mb:.0f}" for _, mb in rss[:: max(1, len(rss) // 12)]) or "not sampled")
            + "."
        )
        lines.append("")
    return lines

"""Overload: offered load at 3× the gateway's ceiling (N = 4, zero-latency upstreams), open loop. What a gateway
with admission control should show: goodput near its ceiling, admitted requests' p99 not far above its value at
75 % load, the rest refused at once with 503 + Retry-After, and memory that stays flat."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import promtext
from bench.harness import Bench, Goal
from bench.procs import listen_overflows
from bench.variants import VARIANTS, Variant, aggregate_body, has_setting, upstream_names

N = 4
GOODPUT_GOAL = 0.9
P99_FACTOR_GOAL = 2.0
SHED_GOAL_MS = 5.0
FLAT_MB = 20.0  # growth over the second half of the run that still counts as flat
GENERATOR_CONNECTIONS = 2048
SHED = "gateway_http_requests_shed_total"
ADAPTIVE_LAG_MS = 20.0  # limits.shed_loop_lag_ms of the second 3× run


def _three_x(bench: Bench, gateway: Variant, body: Path, offered: float) -> dict[str, Any]:
    """One open-loop run at ``offered`` req/s, with the gateway's RSS and admission limit sampled meanwhile."""
    p = bench.profile
    before = bench.scrape(gateway)
    argv = bench.loadgen_argv(
        gateway.url + "/aggregate",
        body,
        seconds=p.overload_s,
        rate=offered,
        warmup=0.5,
        connections=GENERATOR_CONNECTIONS,
        grace=10.0,
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
    return {
        "over": over,
        "rss": rss,
        "admitting": admitting,
        "cpu_used": cpu_used,
        "run_s": run_s,
        "others_s": others_s,
        "overflows": overflows,
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
    base = bench.open(gateway, body, rate=ceiling * 0.75, seconds=p.open_s)
    bench.say(f"overload: ceiling {ceiling:.0f} req/s; 75 %: p99 {base['latency_ok_us']['p99'] / 1000:.1f} ms")

    offered = ceiling * 3
    run_3x = _three_x(bench, gateway, body, offered)
    over, rss, admitting = run_3x["over"], run_3x["rss"], run_3x["admitting"]
    cpu_used, run_s, others_s, overflows = run_3x["cpu_used"], run_3x["run_s"], run_3x["others_s"], run_3x["overflows"]
    gateway.service.stop()
    adaptive: dict[str, Any] | None = None
    if limits and has_setting("limits.shed_loop_lag_ms"):
        # The same offered rate against a gateway whose limit follows its loop's lag (off by default).
        tuned = {**limits, "shed_loop_lag_ms": ADAPTIVE_LAG_MS}
        second = bench.start(
            [VARIANTS["gateway"]], upstream_names(N, bench.upstream(0)), tag="-overload-lag", limits=tuned
        )["gateway"]
        bench.closed(second, body, seconds=p.warmup_s)
        adaptive = _three_x(bench, second, body, offered)
        second.service.stop()

    goodput = over["goodput"]
    shed = over["statuses"].get("503", 0)
    measured = [m for t, m in rss if 0.5 <= t <= p.overload_s + 0.5]
    half = measured[len(measured) // 2 :] or measured
    growth = (max(half) - half[0]) if half else None
    result = {
        "n": N,
        "ceiling": ceiling,
        "admission_limit": limits.get("max_in_flight_requests"),
        "offered": round(offered, 1),
        "baseline_75": base,
        "overload": over,
        "goodput": round(goodput, 1),
        "shed": shed,
        "rss_mb": rss,
        "rss_growth_second_half_mb": growth,
        "admission_limits": admitting,
        "adaptive": None
        if adaptive is None
        else {
            "shed_loop_lag_ms": ADAPTIVE_LAG_MS,
            "overload": adaptive["over"],
            "admission_limits": adaptive["admitting"],
            "listen_overflows": adaptive["overflows"],
        },
    }
    note_shed = "" if shed else "no request was shed: admission control is not available in this build"
    p99_base = base["latency_ok_us"]["p99"] / 1000
    p99_over = over["latency_ok_us"]["p99"] / 1000
    waiting = over["scheduled"] - over["sent"]
    starved = f"{waiting} requests never got one of the {GENERATOR_CONNECTIONS} connections" if waiting else ""
    answers = max(1, over["completed"] + over["warmup_done"])
    core_share = cpu_used / run_s if run_s > 0 else 0.0
    result["core_share"] = round(core_share, 2)
    result["cpu_us_per_answer"] = round(cpu_used / answers * 1e6, 1)
    result["others_on_server_cpu"] = round(others_s / run_s, 2) if run_s > 0 else 0.0
    result["listen_overflows"] = overflows
    shed_lat = over["latency_503_us"]
    tail = (
        f" Refusals took p50 {shed_lat['p50'] / 1000:.1f} ms and p90 {shed_lat['p90'] / 1000:.1f} ms; the tail is in "
        f"connecting: the kernel dropped {overflows} connections from a full listen queue meanwhile "
        f"({over['connections_opened']} opened by the generator), and a dropped handshake is retried after "
        "hundreds of milliseconds."
        if shed and overflows
        else ""
    )
    got = (
        "Its core was saturated"
        if core_share >= 0.9
        else f"It got {core_share:.2f} of its core; other processes took {result['others_on_server_cpu']:.2f}"
    )
    saturated = (
        f"{got} ({result['cpu_us_per_answer']:.0f} µs CPU per answer, admitted or refused). Every refusal still "
        "costs the loop an HTTP parse, the admission check and a 503, on the same loop as the admitted requests, "
        "and waits its turn there."
    )
    remedy = (
        "refuse the excess before any Python runs for it (a shorter listen backlog, so that the kernel holds or "
        "drops it) and admit fewer at once (a lower limits.max_in_flight_requests), so that a saturated loop spends "
        "its time on admitted work."
    )
    why = note_shed or saturated
    bench.goals += [
        Goal(
            "overload",
            f"goodput at 3× ceiling ≥ {GOODPUT_GOAL:.0%} of the ceiling",
            f"{goodput:.0f} req/s = {goodput / ceiling:.0%} of {ceiling:.0f}",
            goodput >= GOODPUT_GOAL * ceiling,
            "" if goodput >= GOODPUT_GOAL * ceiling else "; ".join(x for x in (why, starved) if x),
            "" if goodput >= GOODPUT_GOAL * ceiling or not shed else remedy,
        ),
        Goal(
            "overload",
            f"p99 of admitted requests ≤ {P99_FACTOR_GOAL:g}× its value at 75 % load",
            f"{p99_over:.1f} ms vs {p99_base:.1f} ms",
            p99_over <= P99_FACTOR_GOAL * p99_base,
            "" if p99_over <= P99_FACTOR_GOAL * p99_base else why,
            "" if p99_over <= P99_FACTOR_GOAL * p99_base or not shed else remedy,
        ),
        Goal(
            "overload",
            f"shed requests answered 503 in < {SHED_GOAL_MS:g} ms (p99)",
            f"{over['latency_503_us']['p99'] / 1000:.2f} ms ({shed} shed, "
            f"{over['retry_after_on_503']} with Retry-After)"
            if shed
            else "n/a",
            (over["latency_503_us"]["p99"] / 1000 < SHED_GOAL_MS) if shed else None,
            note_shed or ("" if over["latency_503_us"]["p99"] / 1000 < SHED_GOAL_MS else saturated + tail),
            ""
            if not shed or over["latency_503_us"]["p99"] / 1000 < SHED_GOAL_MS
            else remedy
            + (
                " Clients that keep their connections (a load balancer's pool) never meet the listen "
                "queue; for those that do not, a longer limits.listen_backlog trades drops for a "
                "longer accept burst."
                if overflows
                else ""
            ),
        ),
        Goal(
            "overload",
            f"memory flat (growth over the second half < {FLAT_MB:g} MB)",
            "n/a" if growth is None else f"{growth:+.1f} MB (RSS {measured[0]:.0f} → {measured[-1]:.0f} MB)",
            None if growth is None else growth < FLAT_MB,
        ),
    ]
    return result


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    o, b = result["overload"], result["baseline_75"]

    def row(name: str, r: dict[str, Any], rate: float) -> str:
        ok, shed = r["latency_ok_us"], r["latency_503_us"]
        errors = sum(r["errors"].values()) + sum(v for k, v in r["statuses"].items() if k not in ("200", "503"))
        return (
            f"| {name} | {rate:.0f} | {r['goodput']:.0f} | {ok['p50'] / 1000:.1f} | {ok['p99'] / 1000:.1f} "
            f"| {r['statuses'].get('503', 0)} | {shed['p99'] / 1000:.2f} | {errors} | {r.get('loop_lag_p99_ms', '–')} |"
        )

    lines = [
        f"## Overload (N = {result['n']}, zero-latency upstreams)",
        "",
        f"Ceiling {result['ceiling']:.0f} req/s (closed loop). Open loop at 75 % of it, then at 3× for "
        f"{o['duration_s']:g} s with up to {GENERATOR_CONNECTIONS} connections. Latency from intended send times. "
        + (
            f"`limits.max_in_flight_requests = {result['admission_limit']}` (twice the concurrency the ceiling "
            "is measured with)."
            if result.get("admission_limit")
            else "This build has no admission limit setting."
        ),
        "",
        "| load | offered req/s | goodput req/s | admitted p50 ms | admitted p99 ms | 503s | 503 p99 ms "
        "| other failures | loop lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
        row("75 %", b, b["offered_rate"]),
        row("3×", o, o["offered_rate"]),
    ]
    adaptive = result.get("adaptive")
    if adaptive:
        a = adaptive["overload"]
        lines.append(row(f"3×, limit following lag > {adaptive['shed_loop_lag_ms']:g} ms", a, a["offered_rate"]))
    lines.append("")
    if adaptive:
        limits = adaptive["admission_limits"]
        by_reason = adaptive["overload"].get("shed_by_reason", {})
        lines += [
            "The last row is a second gateway, run right after the first at the same offered rate, with "
            f"`limits.shed_loop_lag_ms = {adaptive['shed_loop_lag_ms']:g}` (off by default): its in-flight limit "
            "drops while the loop lags. Its limit every 0.5 s: "
            + ", ".join(str(n) for n in limits[:: max(1, len(limits) // 12)])
            + f"; shed at the configured limit {by_reason.get('in_flight', 0)}, under the lowered one "
            f"{by_reason.get('loop_lag', 0)}; the kernel dropped {adaptive['listen_overflows']} connections from a "
            "full listen queue meanwhile. One run each, back to back: compare them within this run only.",
            "",
        ]
    if "core_share" in result:
        lines.append(
            f"During the 3× run the gateway used {result['core_share']:.2f} of its core (other processes "
            f"{result.get('others_on_server_cpu', 0):.2f}), {result['cpu_us_per_answer']:.0f} µs CPU per answer "
            "(admitted or refused)."
        )
        lines.append("")
    rss = result["rss_mb"]
    if rss:
        lines.append(
            "Gateway RSS during the 3× run (MB, every 0.5 s): "
            + ", ".join(f"{m:.0f}" for _, m in rss[:: max(1, len(rss) // 12)])
            + "."
        )
    return lines

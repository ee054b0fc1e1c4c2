"""Fan-out cost: /aggregate with N sources against zero-latency upstreams, every variant side by side.

Ceilings come from closed-loop runs, interleaved round by round (each round measures every variant once, in a
rotated order); ratios are taken within a round, then the median. Latency percentiles come from open-loop runs at
25/50/75 % of the slowest variant's ceiling, every variant at the same offered rates.
"""

from __future__ import annotations

from typing import Any

import orjson

from bench.harness import Bench, Goal
from bench.procs import http_request
from bench.profiling import profile_under_load
from bench.stats import fmt_spread, linear_fit, paired_ratio, spread
from bench.variants import VARIANTS, Variant, aggregate_body, upstream_names

ORDER = ("gateway", "gateway-asyncio", "floor", "bare", "fastapi", "threaded")
RATIO_GOALS = (  # (N, other variant, at least)
    (4, "floor", 0.7),
    (8, "floor", 0.7),
    (8, "fastapi", 2.0),
    (8, "threaded", 5.0),
)


def check_answers(variant: Variant, body: bytes, n: int) -> None:
    """Every variant must really fan out and succeed before its speed means anything."""
    status, raw, _ = http_request(variant.url + "/aggregate", method="POST", body=body)
    if status != 200:
        raise RuntimeError(f"{variant.key} answered {status}: {raw[:300]!r}")
    results = orjson.loads(raw)["results"]
    if len(results) != n or not all(r["ok"] and r["data"]["id"] == 42 for r in results.values()):
        raise RuntimeError(f"{variant.key} answered an incomplete aggregate: {raw[:300]!r}")


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    zero = bench.upstream(0)
    specs = [VARIANTS[k] for k in ORDER if k in p.fanout_variants]
    bench.say(f"fan-out: starting {len(specs)} variants")
    variants = bench.start(specs, upstream_names(max(p.fanout_ns), zero))
    bodies = {n: bench.body_file(f"fanout-{n}", aggregate_body(n)) for n in p.fanout_ns}
    for n in p.fanout_ns:
        for v in variants.values():
            check_answers(v, bodies[n].read_bytes(), n)

    raw: dict[int, dict[str, list[dict[str, Any]]]] = {n: {k: [] for k in variants} for n in p.fanout_ns}
    for v in variants.values():  # warm connection pools and code paths; not recorded
        bench.closed(v, bodies[max(p.fanout_ns)], seconds=p.warmup_s)
    for n in p.fanout_ns:
        for rnd in range(p.rounds):
            keys = list(variants)
            keys = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
            for key in keys:
                r = bench.closed(variants[key], bodies[n], seconds=p.ceiling_s)
                raw[n][key].append(r)
                bench.say(f"  N={n} round {rnd + 1} {key}: {r['rps']:.0f} req/s, {r['cpu_us_per_req']} µs CPU/req")

    result: dict[str, Any] = {"rounds": raw, "summary": {}, "ratios": {}, "cpu_slope": {}}
    for n in p.fanout_ns:
        result["summary"][n] = {
            key: {
                metric: spread([r[metric] for r in runs if r.get(metric) is not None])
                for metric in (
                    "rps",
                    "cpu_us_per_req",
                    "cpu_util",
                    "others_on_server_cpu",
                    "loop_lag_p99_ms",
                    "errors",
                    "source_failures",
                )
            }
            for key, runs in raw[n].items()
        }
        gw = [r["rps"] for r in raw[n]["gateway"]]
        result["ratios"][n] = {
            other: paired_ratio(gw, [r["rps"] for r in raw[n][other]]) for other in variants if other != "gateway"
        }
    for key in variants:
        xs = [float(n) for n in p.fanout_ns]
        cpu = [result["summary"][n][key]["cpu_us_per_req"] for n in p.fanout_ns]
        if any(c is None for c in cpu):
            continue
        fit = linear_fit(xs, [c["median"] for c in cpu])
        if fit is not None:
            result["cpu_slope"][key] = {"us_per_upstream_call": round(fit[0], 1), "us_fixed": round(fit[1], 1)}

    result["open_loop"] = open_loop(bench, variants, bodies[p.open_loop_n], p.open_loop_n, result)
    gateway = variants["gateway"]
    n = max(p.fanout_ns)
    seconds = max(2.0, p.ceiling_s)
    result["profile"] = profile_under_load(
        gateway.service.pid,
        seconds,
        lambda: bench.closed(gateway, bodies[n], seconds=seconds + 1),
        bench.workdir.parent / f"profile-gateway-fanout-n{n}.txt",
    )
    result["profile"]["n"] = n
    bench.stop(variants.values())
    goals(bench, result)
    return result


def open_loop(bench: Bench, variants: dict[str, Variant], body: Any, n: int, result: dict[str, Any]) -> dict[str, Any]:
    p = bench.profile
    ceilings = {k: result["summary"][n][k]["rps"]["median"] for k in variants}
    slowest = min(ceilings, key=lambda k: ceilings[k])
    rates = {f: round(ceilings[slowest] * f, 1) for f in p.fractions}
    out: dict[str, Any] = {"n": n, "slowest": slowest, "slowest_ceiling": ceilings[slowest], "rates": {}}
    for fraction, rate in rates.items():
        runs: dict[str, Any] = {}
        for key, v in variants.items():
            runs[key] = bench.open(v, body, rate=rate, seconds=p.open_s)
            lat = runs[key]["latency_ok_us"]
            bench.say(f"  open loop {rate:.0f}/s {key}: p50 {lat['p50'] / 1000:.1f} ms, p99 {lat['p99'] / 1000:.1f} ms")
        out["rates"][f"{fraction:g}"] = {"rate": rate, "runs": runs}
    return out


def why(result: dict[str, Any]) -> str:
    """What the gateway's loop thread spent its CPU on, from its own profile of this run."""
    prof = result.get("profile") or {}
    b = prof.get("breakdown")
    if not b:
        return ""
    framework = max(0.0, b["request_handling"] - b["endpoint"])
    own = max(0.0, b["sources"] - b["http_client"])
    cpu = result["summary"][prof["n"]]
    gw, floor = cpu["gateway"]["cpu_us_per_req"], cpu.get("floor", {}).get("cpu_us_per_req")
    per_req = f"{gw['median']:.0f} µs CPU per request at N = {prof['n']}" if gw else ""
    vs = f" against the floor's {floor['median']:.0f} µs" if floor else ""
    return (
        f"The gateway spends {per_req}{vs}. Its profile (py-spy): {framework:.0%} of its CPU in the front layer and "
        f"framework outside the endpoint (cross-cutting rules, routing, body, validation, response), {own:.0%} in "
        f"its own per-source code outside the HTTP client (limits, deadline, retries, breaker, metrics, trace "
        f"context, one task per source), {b['http_client']:.0%} in aiohttp's client, which the floor pays too."
    )


REMEDY = (
    "send upstream calls with less of aiohttp's per-request machinery (its request and response objects, header "
    "merging and timers are most of the HTTP client's share, now the largest), and fold the seven pure-ASGI "
    "middleware layers, each of which wraps send, into fewer. Already done: POST /aggregate on a lean ASGI route "
    "(the body validated by pydantic from bytes in one pass, no FastAPI routing or dependency solving: 0.81x the "
    "CPU per request at N = 1), one deadline timer per request, metric children cached, trace ids without a "
    "system call, no task factory, no cookie jar, and collector thresholds that cut garbage collection from "
    "15-19 % of the CPU to about 3 % (app/lifecycle/heap.py). Measure each step with "
    "`python -m bench.ab --against <rev>`, whose A/A control shows what this machine's noise is."
)


def goals(bench: Bench, result: dict[str, Any]) -> None:
    note = why(result)
    for n, other, target in RATIO_GOALS:
        ratio = result["ratios"].get(n, {}).get(other)
        if ratio is None:
            continue
        met = ratio["median"] >= target
        bench.goals.append(
            Goal(
                "fan-out",
                f"gateway ≥ {target:g}× {VARIANTS[other].label} throughput at N = {n}",
                f"{fmt_spread(ratio, '{:.2f}')}×",
                met,
                "" if met else note,
                "" if met else REMEDY,
            )
        )


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    p = bench.profile
    lines = ["## Fan-out cost (zero-latency upstreams)", ""]
    lines.append(
        f"Closed loop (wrk, {p.connections} connections, {p.ceiling_s:g} s per run, {p.rounds} interleaved "
        "rounds): median (min–max) over rounds. CPU is the variant's own process (user + system) per request. "
        "*Core share*: its CPU seconds per second of the run (below 1.0 at saturation: it did not get its whole "
        "core); *others*: the share of the server CPU that other processes on this machine used meanwhile."
    )
    lines += [
        "",
        "| N | variant | req/s | CPU µs/req | core share | others | loop lag p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, per in result["summary"].items():
        for key, s in per.items():
            lag = fmt_spread(s["loop_lag_p99_ms"], "{:.2f}") if s["loop_lag_p99_ms"] else "–"
            errors: str = str(int(s["errors"]["median"])) if s["errors"] else "0"
            failed = s["source_failures"]
            if failed and failed["max"]:
                errors += f" (+{int(failed['max'])} source failures)"
            lines.append(
                f"| {n} | {VARIANTS[key].label} | {fmt_spread(s['rps'])} | {fmt_spread(s['cpu_us_per_req'])} "
                f"| {fmt_spread(s['cpu_util'], '{:.2f}')} | {fmt_spread(s.get('others_on_server_cpu'), '{:.2f}')} "
                f"| {lag} | {errors} |"
            )
    lines += ["", "Throughput ratios, gateway (uvloop) over each variant, paired within each round:", ""]
    others = [k for k in ORDER if k != "gateway" and k in bench.profile.fanout_variants]
    lines += ["| N | " + " | ".join(VARIANTS[k].label for k in others) + " |", "|---" * (len(others) + 1) + "|"]
    for n, ratios in result["ratios"].items():
        lines.append(f"| {n} | " + " | ".join(f"{fmt_spread(ratios.get(k), '{:.2f}')}×" for k in others) + " |")
    if result["cpu_slope"]:
        lines += [
            "",
            f"CPU per request as a line in N (least squares over N = {', '.join(str(n) for n in p.fanout_ns)}):",
            "",
        ]
        lines += ["| variant | µs per upstream call (slope) | µs fixed per request |", "|---|---|---|"]
        for key, fit in result["cpu_slope"].items():
            lines.append(f"| {VARIANTS[key].label} | {fit['us_per_upstream_call']:.0f} | {fit['us_fixed']:.0f} |")
    ol = result.get("open_loop")
    if ol:
        lines += [
            "",
            f"Open loop at N = {ol['n']}: fixed rates at 25/50/75 % of the slowest variant's ceiling "
            f"({VARIANTS[ol['slowest']].label}, {ol['slowest_ceiling']:.0f} req/s), {p.open_s:g} s each; latency "
            "from each request's intended send time (no coordinated omission). Every variant at the same rates.",
            "",
            "| rate req/s | variant | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | samples | errors "
            "| loop lag p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in ol["rates"].values():
            for key, r in entry["runs"].items():
                lat = r["latency_ok_us"]
                bad = r["completed"] - r["ok"] + sum(r["errors"].values())
                lines.append(
                    f"| {entry['rate']:.0f} | {VARIANTS[key].label} | {lat['p50'] / 1000:.2f} "
                    f"| {lat['p90'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {lat['p999'] / 1000:.2f} "
                    f"| {lat['max'] / 1000:.2f} | {lat['count']} "
                    f"| {bad} | {r.get('loop_lag_p99_ms', '–')} |"
                )
    prof = result.get("profile")
    if prof and "top_self" in prof:
        b = prof["breakdown"]
        lines += [
            "",
            f"Where the gateway's event-loop thread spends its CPU at N = {prof['n']} under closed-loop load (py-spy, "
            f"{prof['samples']} samples; collapsed stacks in `{prof['file']}` next to the results): "
            f"request handling (front layer, framework) {b['request_handling']:.0%} (of which the endpoint "
            f"{b['endpoint']:.0%}), the sources' tasks {b['sources']:.0%} (of which aiohttp's client "
            f"{b['http_client']:.0%}). Top functions by self time:",
            "",
            "| function | self |",
            "|---|---|",
        ]
        for name, share in prof["top_self"][:12]:
            lines.append(f"| `{name}` | {share:.1%} |")
    elif prof:
        lines += ["", f"Profile not taken: {prof.get('error')}"]
    return lines

"""Fan-out cost: /aggregate with N sources against zero-latency upstreams, every variant side by side.

Ceilings come from closed-loop runs, interleaved round by round (each round measures every variant once, in a
rotated order); ratios are taken within a round, then the median. Latency percentiles come from open-loop runs at
25/50/75 % of the slowest variant's ceiling, every variant at the same offered rates. Last, py-spy profiles of the
gateway and of the bare stack (its own stack without it) at the narrowest and the widest N, reduced to CPU per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from bench.harness import Bench, Goal
from bench.procs import http_request
from bench.profiling import LAYER_LABELS, SCRAPE, profile_under_load
from bench.stats import fmt_spread, linear_fit, paired_ratio, spread
from bench.variants import VARIANTS, Variant, aggregate_body, upstream_names

ORDER = ("gateway", "gateway-asyncio", "floor", "bare", "fastapi", "threaded")
RATIO_GOALS = (  # (N, other variant, at least)
    (4, "floor", 0.7),
    (8, "floor", 0.7),
    (8, "fastapi", 2.0),
    (8, "threaded", 5.0),
)
UVLOOP_GOAL = (4, 8), 1.1  # gateway on uvloop over itself on asyncio's loop, at these N
LAG_GOAL_MS = 10.0  # loop-lag p99 at fan-out saturation (the closed-loop runs), at every N


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
    result["profiles"] = profiles(bench, variants, bodies)
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


PROFILED = ("gateway", "bare")  # the gateway, and its own stack without it


def profiles(bench: Bench, variants: dict[str, Variant], bodies: dict[int, Any]) -> dict[int, dict[str, Any]]:
    """py-spy profiles of the gateway and of the bare stack under closed-loop load, at the narrowest and the widest
    fan-out: where each spends its CPU, by layer."""
    p = bench.profile
    seconds = max(2.0, p.ceiling_s)
    out: dict[int, dict[str, Any]] = {}
    for n in sorted({min(p.fanout_ns), max(p.fanout_ns)}):
        out[n] = {}
        for key in PROFILED:
            if key not in variants:
                continue
            v = variants[key]
            load = functools.partial(bench.closed, v, bodies[n], seconds=seconds + 1)
            out[n][key] = profile_under_load(
                v.service.pid, seconds, load, bench.workdir.parent / f"profile-{key}-fanout-n{n}.txt"
            )
    return out


def layer_costs(result: dict[str, Any], n: int, key: str) -> dict[str, tuple[float, float | None]] | None:
    """Per layer: the share of the variant's profiled CPU and, from it, µs per request: the layer's share of the
    per-request samples (all but scrapes) times the median CPU per request of the unprofiled rounds at this N, whose
    CPU is counted between the scrapes."""
    prof = (result.get("profiles") or {}).get(n, {}).get(key) or {}
    if "layers" not in prof:
        return None
    cpu = result["summary"][n].get(key, {}).get("cpu_us_per_req")
    layers: dict[str, float] = prof["layers"]
    per_request = 1.0 - layers.get(SCRAPE[0], 0.0)
    scale = cpu["median"] / per_request if cpu and per_request > 0 else None
    return {
        layer: (share, None if scale is None or layer == SCRAPE[0] else share * scale)
        for layer, share in layers.items()
    }


def why(result: dict[str, Any]) -> str:
    """Where the gateway's loop thread spends its CPU beyond what the bare stack spends, from the profiles."""
    profs = result.get("profiles") or {}
    if not profs:
        return ""
    n = max(profs)
    gw, bare = layer_costs(result, n, "gateway"), layer_costs(result, n, "bare")
    if gw is None:
        return ""
    cpu = result["summary"][n]
    per_req = {k: s["cpu_us_per_req"]["median"] for k, s in cpu.items() if s.get("cpu_us_per_req")}
    names = {"bare": "the bare stack's", "floor": "the floor's"}
    vs = ", ".join(f"{names[k]} {per_req[k]:.0f} µs" for k in names if k in per_req)
    head = f"The gateway spends {per_req.get('gateway', 0):.0f} µs CPU per request at N = {n}" + (
        f" against {vs}." if vs else "."
    )

    def extra(layer: str) -> float:
        mine = gw[layer][1] or 0.0
        return mine - ((bare[layer][1] or 0.0) if bare else 0.0)

    if gw[next(iter(gw))][1] is None:
        return head  # no CPU per request to price the shares with
    biggest = sorted(gw, key=extra, reverse=True)[:3]
    parts = ", ".join(
        f"{LAYER_LABELS[k].split(' (')[0]} {gw[k][1] or 0:.0f} µs"
        + (f" (bare stack {bare[k][1] or 0:.0f})" if bare else "")
        for k in biggest
    )
    what = "largest excess over the bare stack" if bare else "largest layers"
    return f"{head} By layer (py-spy self time), the gateway's {what}: {parts}."


REMEDY = (
    "send upstream calls with less of aiohttp's per-request machinery (its request and response objects, header "
    "merging and timers are most of the HTTP client's share, now the largest), and cut the event loop's own share "
    "(callbacks, timers and tasks per request; compare the per-layer table with the bare stack's). Already done: one "
    "ASGI front layer instead of seven middleware wrappers, POST /aggregate served from it (the body validated by "
    "pydantic from bytes in one pass), one deadline timer per request, a lone source run in the request's own task, "
    "client disconnects signalled by the protocol instead of a watcher task, metric children cached, trace ids "
    "without a system call, no cookie jar, and collector thresholds that cut garbage collection from 15-19 % of "
    "the CPU to about 3 % (app/lifecycle/heap.py). Measure each step with `python -m bench.ab --against <rev>`, "
    "whose A/A control shows what this machine's noise is."
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
    ns, target = UVLOOP_GOAL
    uvloop = {n: result["ratios"].get(n, {}).get("gateway-asyncio") for n in ns}
    if any(r is not None for r in uvloop.values()):
        met = all(r is not None and r["median"] >= target for r in uvloop.values())
        bench.goals.append(
            Goal(
                "fan-out",
                f"gateway on uvloop ≥ {target:g}× itself on asyncio's loop at N = {' and '.join(map(str, ns))}",
                ", ".join(f"N = {n}: {fmt_spread(r, '{:.2f}')}×" for n, r in uvloop.items()),
                met,
                "" if met else "paired within rounds; where the loop's time goes: the per-layer profile below",
            )
        )
    lags = {n: s["gateway"]["loop_lag_p99_ms"] for n, s in result["summary"].items() if "gateway" in s}
    if lags:
        worst = [lag["median"] for lag in lags.values() if lag is not None]
        met_lag = bool(worst) and len(worst) == len(lags) and max(worst) < LAG_GOAL_MS
        bench.goals.append(
            Goal(
                "fan-out",
                f"loop-lag p99 at fan-out saturation < {LAG_GOAL_MS:g} ms",
                ", ".join(f"N = {n}: {fmt_spread(lag, '{:.1f}')} ms" for n, lag in lags.items()),
                met_lag if worst else None,
                ""
                if met_lag
                else "gateway on uvloop, closed loop (median over rounds, from its own histogram); a "
                "loop lag sample waits behind every callback that is due before it",
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
    lines += uvloop_and_lag(result)
    lines += layer_tables(result)
    return lines


def uvloop_and_lag(result: dict[str, Any]) -> list[str]:
    if not any("gateway-asyncio" in r for r in result["ratios"].values()):
        return []
    lines = [
        "",
        "The gateway on uvloop against itself on asyncio's own loop (throughput, paired within rounds), and its "
        "loop lag at saturation (p99 over each closed-loop run, from its own histogram; median over rounds):",
        "",
        "| N | uvloop / asyncio | loop lag p99 ms, uvloop | loop lag p99 ms, asyncio |",
        "|---|---|---|---|",
    ]
    for n, ratios in result["ratios"].items():
        per = result["summary"][n]
        lags = [fmt_spread(per.get(k, {}).get("loop_lag_p99_ms"), "{:.1f}") for k in ("gateway", "gateway-asyncio")]
        lines.append(f"| {n} | {fmt_spread(ratios.get('gateway-asyncio'), '{:.2f}')}× | {lags[0]} | {lags[1]} |")
    return lines


def layer_tables(result: dict[str, Any]) -> list[str]:
    """One table per profiled N: the share of each layer in the gateway's and the bare stack's CPU."""
    profs: dict[int, dict[str, Any]] = result.get("profiles") or {}
    lines: list[str] = []
    for n, by_variant in profs.items():
        gw = by_variant.get("gateway", {})
        if "layers" not in gw:
            lines += ["", f"Profile at N = {n} not taken: {gw.get('error', 'no samples')}"]
            continue
        keys = [k for k in PROFILED if "layers" in by_variant.get(k, {})]
        costs = {k: layer_costs(result, n, k) or {} for k in keys}
        if n == min(profs):
            lines += [
                "",
                "Where the CPU goes, by layer (py-spy under closed-loop load, event-loop thread only): each sample's "
                "time is charged to its innermost frame that belongs to a layer, by the file that frame's code is "
                "in (`LAYERS` in `bench/profiling.py`); standard-library helpers (enum, typing, contextlib, ...) "
                "count to their caller, and C extensions (orjson, httptools, uvloop's loop, aiohttp's parser) to "
                "the Python function that called them (the loop's own work, I/O included, to `Runner.run`, "
                "which entered it). Shares are of the time the thread was running, so they sum "
                "to 100 %; µs per request are the share of the samples outside scrapes times the median CPU per "
                "request of the unprofiled runs at that N. Collapsed stacks are kept next to the results "
                "(`profile-<variant>-fanout-n<N>.txt`).",
            ]
        samples = ", ".join(f"{VARIANTS[k].label} {by_variant[k]['samples']}" for k in keys)
        lines += [
            "",
            f"N = {n} (samples: {samples}):",
            "",
            "| layer | " + " | ".join(f"{VARIANTS[k].label} share | µs/req" for k in keys) + " |",
            "|---" * (1 + 2 * len(keys)) + "|",
        ]
        for layer, label in LAYER_LABELS.items():
            cells = []
            for k in keys:
                share, us = costs[k].get(layer, (0.0, None))
                cells += [f"{share:.0%}", "–" if us is None else f"{us:.0f}"]
            if any(costs[k].get(layer, (0.0, None))[0] for k in keys):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        top = ", ".join(f"`{name}` {share:.1%}" for name, share in gw["top_self"][:5])
        lines += ["", f"The gateway's top functions by self time at N = {n}: {top}."]
    return lines

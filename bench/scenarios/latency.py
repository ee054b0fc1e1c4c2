"""Latency overhead: N = 5 sources, each upstream answering in exactly 20 ms, open loop at 50 % of the gateway's
ceiling. Every variant at that same rate; the upstream alone at that rate is the baseline."""

from __future__ import annotations

from typing import Any

from bench.harness import Bench, Goal
from bench.stats import fmt_spread, spread
from bench.variants import VARIANTS, aggregate_body, upstream_names

N = 5
LATENCY_MS = 20.0
FRACTION = 0.5
P50_GOAL_MS = 2.0
P99_GOAL_MS = 10.0
# Enough concurrency that the closed loop, not the upstream's 20 ms, limits the ceiling.
CEILING_CONNECTIONS = 256


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    slow = bench.upstream(LATENCY_MS)
    keys = list(p.latency_variants)
    bench.say(f"latency: starting {', '.join(keys)}")
    variants = bench.start([VARIANTS[k] for k in keys], upstream_names(N, slow))
    body = bench.body_file("latency", aggregate_body(N))
    ceilings: dict[str, list[float]] = {k: [] for k in keys}
    for key, v in variants.items():
        bench.closed(v, body, seconds=p.warmup_s, connections=CEILING_CONNECTIONS)
        ceilings[key].append(bench.closed(v, body, seconds=p.ceiling_s, connections=CEILING_CONNECTIONS)["rps"])
    rate = round(max(ceilings["gateway"]) * FRACTION, 1)
    bench.say(f"  gateway ceiling {max(ceilings['gateway']):.0f} req/s; open loop at {rate:.0f} req/s")

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in [*keys, "direct"]}
    for rnd in range(p.rounds):
        for key, v in variants.items():
            r = bench.open(v, body, rate=rate, seconds=p.open_s)
            runs[key].append(r)
            bench.say(
                f"  round {rnd + 1} {key}: p50 {r['latency_ok_us']['p50'] / 1000:.2f} ms "
                f"p99 {r['latency_ok_us']['p99'] / 1000:.2f} ms"
            )
        # The upstream alone, at the same rate of single calls: what 20 ms looks like through this generator.
        runs["direct"].append(bench.loadgen(f"{slow}/item/0", None, seconds=p.open_s, rate=rate, warmup=0.5))
    bench.stop(variants.values())

    summary: dict[str, Any] = {}
    for key, rs in runs.items():
        summary[key] = {
            q: spread([r["latency_ok_us"][q] / 1000 for r in rs]) for q in ("p50", "p90", "p99", "p999", "max")
        }
        summary[key]["errors"] = sum(r["completed"] - r["ok"] + sum(r["errors"].values()) for r in rs)
        summary[key]["samples"] = sum(r["latency_ok_us"]["count"] for r in rs)
        lag = [r["loop_lag_p99_ms"] for r in rs if r.get("loop_lag_p99_ms") is not None]
        summary[key]["loop_lag_p99_ms"] = spread(lag)
    result = {"n": N, "latency_ms": LATENCY_MS, "rate": rate, "ceilings": ceilings, "runs": runs, "summary": summary}
    gw = summary["gateway"]
    over = {q: gw[q]["median"] - LATENCY_MS for q in ("p50", "p99")}
    alone = {q: summary["direct"][q]["median"] - LATENCY_MS for q in ("p50", "p99")}
    others = spread([r["others_on_server_cpu"] for r in runs["gateway"] if "others_on_server_cpu" in r])
    result["overhead_ms"] = over
    noise = (
        f"The upstream called alone at the same rate shows p50 {alone['p50']:+.2f} ms and p99 {alone['p99']:+.2f} "
        "ms over 20 ms: that much is this machine (timer granularity, scheduling, the generator), not the gateway."
        + (f" Other processes used {others['median']:.0%} of the gateway's CPU meanwhile." if others else "")
    )
    remedy = (
        "less CPU per request (see fan-out): at half the ceiling the gateway's loop is busy about half the time, "
        "so a request often waits for the loop to finish other work; and a quiet machine for the tails."
    )
    for q, goal in (("p50", P50_GOAL_MS), ("p99", P99_GOAL_MS)):
        met = over[q] < goal
        bench.goals.append(
            Goal(
                "latency",
                f"{q} overhead over 20 ms < {goal:g} ms at 50 % of the ceiling",
                f"{over[q]:.2f} ms at {rate:.0f} req/s",
                met,
                "" if met else noise,
                "" if met else remedy,
            )
        )
    return result


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    p = bench.profile
    lines = [
        f"## Latency overhead (N = {result['n']}, every upstream {result['latency_ms']:g} ms)",
        "",
        f"Open loop at {result['rate']:.0f} req/s (50 % of the gateway's ceiling, "
        f"{max(result['ceilings']['gateway']):.0f} req/s), {p.open_s:g} s per run, {p.rounds} interleaved rounds; "
        "median (min–max) over rounds, in ms. *upstream alone* is the fixed-latency server called directly at the "
        "same rate: the floor of what this generator can see.",
        "",
        "| variant | ceiling req/s | p50 | p90 | p99 | p99.9 | max | samples | errors | loop lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in result["summary"].items():
        label = "upstream alone" if key == "direct" else VARIANTS[key].label
        ceiling = result["ceilings"].get(key)
        over = " (below this rate: overloaded)" if ceiling and max(ceiling) < result["rate"] else ""
        lag = fmt_spread(s["loop_lag_p99_ms"], "{:.2f}") if s["loop_lag_p99_ms"] else "–"
        lines.append(
            f"| {label} | {f'{max(ceiling):.0f}' if ceiling else '–'}{over} | "
            + " | ".join(fmt_spread(s[q], "{:.2f}") for q in ("p50", "p90", "p99", "p999", "max"))
            + f" | {s['samples']} | {s['errors']} | {lag} |"
        )
    o = result["overhead_ms"]
    lines += ["", f"Gateway overhead over {result['latency_ms']:g} ms: p50 {o['p50']:+.2f} ms, p99 {o['p99']:+.2f} ms."]
    return lines

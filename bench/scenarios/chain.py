"""Chained sources: a 3-level chain (s0 → s1 → s2, each source's path made from its parent's answer) against
upstreams answering in exactly 20 ms, beside a flat fan-out of the same 3 sources, in the same run.

The chain's critical path is 3 × 20 ms; the gateway's overhead is its p50 above that (open loop, the two bodies
interleaved at the same rate). CPU per source comes from closed-loop runs of both, so the price of the graph (one
waiting task and an event per chained source, the templates made into plans) shows against the flat fan-out's.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from bench.harness import Bench, Goal
from bench.procs import http_request
from bench.stats import fmt_spread, spread
from bench.variants import VARIANTS, Variant, aggregate_body, upstream_names

N = 3
LATENCY_MS = 20.0
FRACTION = 0.5
P50_GOAL_MS = 2.0
CEILING_CONNECTIONS = 256


def chain_body() -> bytes:
    """s0 → s1 → s2 on three upstreams; every upstream answers the same object, whose id (42) and stock.units (17)
    make the next path."""
    sources = {
        "s0": {"upstream": "u0", "path": "/item/0"},
        "s1": {"upstream": "u1", "path": "/item/${s0.data.id}"},
        "s2": {"upstream": "u2", "path": "/item/${s1.data.stock.units}", "params": {"name": "${s1.data.name}"}},
    }
    return json.dumps({"sources": sources}).encode()


def check_answers(variant: Variant, body: bytes, *, chained: bool) -> None:
    status, raw, _ = http_request(variant.url + "/aggregate", method="POST", body=body)
    if status != 200:
        raise RuntimeError(f"{variant.key} answered {status}: {raw[:300]!r}")
    results = orjson.loads(raw)["results"]
    if len(results) != N or not all(r["ok"] for r in results.values()):
        raise RuntimeError(f"{variant.key} answered an incomplete aggregate: {raw[:300]!r}")
    if chained and results["s2"].get("waited_for") != ["s1"]:
        raise RuntimeError(f"{variant.key} did not chain: {raw[:300]!r}")


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    slow = bench.upstream(LATENCY_MS)
    bench.say("chain: starting the gateway")
    variants = bench.start([VARIANTS["gateway"]], upstream_names(N, slow))
    gateway = variants["gateway"]
    bodies = {"flat": bench.body_file("chain-flat", aggregate_body(N)), "chain": bench.body_file("chain", chain_body())}
    for kind, body in bodies.items():
        check_answers(gateway, body.read_bytes(), chained=kind == "chain")

    closed: dict[str, list[dict[str, Any]]] = {kind: [] for kind in bodies}
    for body in bodies.values():
        bench.closed(gateway, body, seconds=p.warmup_s, connections=CEILING_CONNECTIONS)
    for rnd in range(p.rounds):
        for kind in list(bodies)[rnd % 2 :] + list(bodies)[: rnd % 2]:
            r = bench.closed(gateway, bodies[kind], seconds=p.ceiling_s, connections=CEILING_CONNECTIONS)
            closed[kind].append(r)
            bench.say(f"  round {rnd + 1} {kind}: {r['rps']:.0f} req/s, {r['cpu_us_per_req']} µs CPU/req")
    # The chain's ceiling is the lower (three round trips per request on the same connections).
    rate = round(min(max(r["rps"] for r in runs) for runs in closed.values()) * FRACTION, 1)
    if rate <= 0:
        raise RuntimeError(f"a closed-loop run answered nothing: {closed}")
    bench.say(f"  open loop at {rate:.0f} req/s")
    open_runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in bodies}
    for rnd in range(p.rounds):
        for kind, body in bodies.items():
            r = bench.open(gateway, body, rate=rate, seconds=p.open_s)
            open_runs[kind].append(r)
            bench.say(f"  round {rnd + 1} {kind}: p50 {r['latency_ok_us']['p50'] / 1000:.2f} ms")
    bench.stop(variants.values())

    critical = {"flat": LATENCY_MS, "chain": N * LATENCY_MS}
    summary: dict[str, Any] = {}
    for kind in bodies:
        cpu = [r["cpu_us_per_req"] for r in closed[kind] if r.get("cpu_us_per_req") is not None]
        summary[kind] = {
            "rps": spread([r["rps"] for r in closed[kind]]),
            "cpu_us_per_req": spread(cpu),
            "cpu_us_per_source": spread([c / N for c in cpu]),
            "errors": sum(r["errors"] for r in closed[kind])
            + sum(r["completed"] - r["ok"] + sum(r["errors"].values()) for r in open_runs[kind]),
            **{
                q: spread([r["latency_ok_us"][q] / 1000 for r in open_runs[kind]]) for q in ("p50", "p90", "p99", "max")
            },
        }
        p50 = summary[kind]["p50"]
        summary[kind]["overhead_p50_ms"] = None if p50 is None else round(p50["median"] - critical[kind], 2)
    result = {"n": N, "latency_ms": LATENCY_MS, "rate": rate, "summary": summary, "closed": closed}
    result["open"] = open_runs
    over = summary["chain"]["overhead_p50_ms"]
    if over is not None:
        met = over < P50_GOAL_MS
        bench.goals.append(
            Goal(
                "chain",
                f"3-level chain: p50 over its critical path ({N} × {LATENCY_MS:g} ms) < {P50_GOAL_MS:g} ms",
                f"{over:.2f} ms at {rate:.0f} req/s",
                met,
                "" if met else "three round trips through the gateway's loop, each waiting its turn at this load",
                "" if met else "less CPU per request (see fan-out): the loop is shared by every request in flight",
            )
        )
    return result


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    p = bench.profile
    lines = [
        f"## Chained sources (a {result['n']}-level chain beside a flat fan-out of {result['n']}, "
        f"every upstream {result['latency_ms']:g} ms)",
        "",
        f"Closed loop ({CEILING_CONNECTIONS} connections, {p.ceiling_s:g} s per run) for throughput and CPU; open loop "
        f"at {result['rate']:.0f} req/s ({FRACTION:.0%} of the chain's ceiling), {p.open_s:g} s per run, "
        f"{p.rounds} interleaved rounds, for latency. The critical path is {result['latency_ms']:g} ms flat and "
        f"{result['n'] * result['latency_ms']:g} ms chained; *over* is the p50 above it.",
        "",
        "| body | req/s | CPU µs/req | CPU µs/source | p50 ms | p99 ms | over ms (p50) | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in result["summary"].items():
        lines.append(
            f"| {kind} | {fmt_spread(s['rps'])} | {fmt_spread(s['cpu_us_per_req'])} "
            f"| {fmt_spread(s['cpu_us_per_source'])} | {fmt_spread(s['p50'], '{:.2f}')} "
            f"| {fmt_spread(s['p99'], '{:.2f}')} | {s['overhead_p50_ms']} | {s['errors']} |"
        )
    return lines

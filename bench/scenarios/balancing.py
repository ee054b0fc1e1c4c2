"""Balancing: one upstream with 4 endpoints, three answering in 5 ms and one in 55 ms (it adds 50 ms), N = 4
sources on it per aggregate. Two gateways side by side, identical but for `policy` (P2C, round robin), at the same
open-loop rate (50 % of the lower ceiling), interleaved round by round: the aggregate's p50 and p99."""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.harness import Bench, Goal
from bench.procs import Service, free_port
from bench.stats import fmt_spread, spread
from bench.variants import GATEWAY_ENV, VARIANTS, start_variant

N = 4
BASE_MS = 5.0
SLOW_EXTRA_MS = 50.0
FRACTION = 0.5
POLICIES = ("p2c", "round_robin")


def _delay_server(bench: Bench, latency_ms: float) -> str:
    """A fixed-latency server of its own (the harness shares one per latency; here each endpoint is a server)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstreams.delay", "--port", str(port), "--latency-ms", f"{latency_ms:g}"]
    service = Service(
        f"endpoint-{port}", argv, cpus=bench.pinning.load, health_url=f"http://127.0.0.1:{port}/healthz",
        log_dir=bench.workdir,
    )  # fmt: skip
    bench.own(service.start()).wait_ready()
    return f"http://127.0.0.1:{port}"


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    endpoints = [_delay_server(bench, BASE_MS) for _ in range(3)] + [_delay_server(bench, BASE_MS + SLOW_EXTRA_MS)]
    bench.say(f"balancing: 4 endpoints, one {SLOW_EXTRA_MS:g} ms slower; starting {', '.join(POLICIES)}")
    # The harness writes upstreams as base URLs: the endpoints and the policy come through the environment, as an
    # operator's overrides would (the first endpoint is the base URL, so each endpoint is called by its own name).
    env = {"GATEWAY_UPSTREAMS__POOL__ENDPOINTS": json.dumps(endpoints), "GATEWAY_UPSTREAMS__POOL__TIMEOUT_MS": "2000"}
    variants = {
        policy: start_variant(
            VARIANTS["gateway"],
            {"pool": endpoints[0]},
            cpus=bench.pinning.every,
            workdir=bench.workdir,
            tag=f"-{policy}",
            env={**GATEWAY_ENV, **env, "GATEWAY_UPSTREAMS__POOL__POLICY": policy},
        )
        for policy in POLICIES
    }
    for variant in variants.values():
        bench.own(variant.service)
    for variant in variants.values():
        variant.service.wait_ready(timeout=90)
        variant.service.pin(bench.pinning.server)
    sources = {f"s{i}": {"upstream": "pool", "path": f"/item/{i}"} for i in range(N)}
    body = bench.body_file("balancing", json.dumps({"sources": sources}).encode())
    ceilings: dict[str, float] = {}
    for key, v in variants.items():
        bench.closed(v, body, seconds=p.warmup_s)
        ceilings[key] = bench.closed(v, body, seconds=p.ceiling_s)["rps"]
    rate = round(min(ceilings.values()) * FRACTION, 1)
    bench.say(f"  ceilings {ceilings}; open loop at {rate:.0f} req/s")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in POLICIES}
    for rnd in range(p.rounds):
        for key, v in variants.items():
            r = bench.open(v, body, rate=rate, seconds=p.open_s)
            runs[key].append(r)
            lat = r["latency_ok_us"]
            bench.say(f"  round {rnd + 1} {key}: p50 {lat['p50'] / 1000:.2f} ms p99 {lat['p99'] / 1000:.2f} ms")
    bench.stop(variants.values())

    summary: dict[str, Any] = {}
    for key, rs in runs.items():
        summary[key] = {q: spread([r["latency_ok_us"][q] / 1000 for r in rs]) for q in ("p50", "p90", "p99", "max")}
        summary[key]["errors"] = sum(r["completed"] - r["ok"] + sum(r["errors"].values()) for r in rs)
        summary[key]["samples"] = sum(r["latency_ok_us"]["count"] for r in rs)
    p2c, rr = summary["p2c"]["p99"]["median"], summary["round_robin"]["p99"]["median"]
    bench.goals.append(
        Goal(
            "balancing",
            "aggregate p99 with P2C below round robin's, one endpoint of 4 adding 50 ms",
            f"P2C {p2c:.1f} ms, round robin {rr:.1f} ms at {rate:.0f} req/s",
            p2c < rr,
        )
    )
    return {"n": N, "base_ms": BASE_MS, "slow_extra_ms": SLOW_EXTRA_MS, "rate": rate, "ceilings": ceilings,
            "runs": runs, "summary": summary}  # fmt: skip


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    p = bench.profile
    lines = [
        f"## Balancing (4 endpoints, one adding {result['slow_extra_ms']:g} ms; N = {result['n']})",
        "",
        f"Three endpoints answer in {result['base_ms']:g} ms, one in {result['base_ms'] + result['slow_extra_ms']:g}"
        f" ms; every aggregate calls the upstream {result['n']} times. Open loop at {result['rate']:.0f} req/s (50 % "
        f"of the lower ceiling), {p.open_s:g} s per run, {p.rounds} interleaved rounds; median (min–max), in ms.",
        "",
        "| policy | ceiling req/s | p50 | p90 | p99 | max | samples | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in result["summary"].items():
        lines.append(
            f"| {key} | {result['ceilings'][key]:.0f} | "
            + " | ".join(fmt_spread(s[q], "{:.2f}") for q in ("p50", "p90", "p99", "max"))
            + f" | {s['samples']} | {s['errors']} |"
        )
    return lines

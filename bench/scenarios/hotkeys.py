"""Hot keys: the upstream cache and single flight against many clients asking for the same few things.

Two gateways side by side on the same 20 ms upstream, which echoes the path it was asked for: one with the cache
and coalescing on for that upstream, one without. Each is loaded in closed loop with one source per request, keys
drawn from a Zipf law (s = 1.1 over 1,000 keys: key 1 is asked for about 14 % of the time, the hottest 10 keys
about 40 %), every answer checked against the key asked for. Upstream calls are counted by each gateway's own
attempt counter. Then a verification pass asks both gateways for every key and compares the answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench import promtext
from bench.harness import Bench, Goal
from bench.procs import Service, free_port
from bench.stats import fmt_spread, paired_ratio, spread
from bench.variants import VARIANTS, Variant, start_variant

KEYS = 1000
ZIPF_S = 1.1
LATENCY_MS = 20.0
THROUGHPUT_GOAL = 3.0
CALLS_GOAL = 5.0
ATTEMPTS = "gateway_upstream_request_duration_seconds_count"


def echo_upstream(bench: Bench) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstreams.delay", "--port", str(port), "--latency-ms", f"{LATENCY_MS:g}",
            "--echo"]  # fmt: skip
    service = Service("delay-echo", argv, cpus=bench.pinning.load, health_url=f"http://127.0.0.1:{port}/healthz",
                      log_dir=bench.workdir)  # fmt: skip
    bench.own(service.start()).wait_ready()
    return f"http://127.0.0.1:{port}"


def generator(bench: Bench, url: str, *extra: str) -> dict[str, Any]:
    argv = [*bench.pinning.prefix(bench.pinning.load), sys.executable, "-m", "bench.hotkeys_load", "--url", url,
            "--keys", str(KEYS), "--zipf-s", f"{ZIPF_S:g}", *extra]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"hot-key generator failed: {done.stderr.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measured(bench: Bench, variant: Variant, seconds: float, warmup: float) -> dict[str, Any]:
    before = bench.scrape(variant)
    cpu0 = variant.service.cpu_seconds()
    run = generator(bench, variant.url, "--duration", f"{seconds:g}", "--warmup", f"{warmup:g}",
                    "--connections", str(bench.profile.connections))  # fmt: skip
    after = bench.scrape(variant)
    if before is not None and after is not None:
        calls = promtext.total(after, ATTEMPTS) - promtext.total(before, ATTEMPTS)
        # The scrape window holds the warm-up too: per request over every request answered meanwhile.
        run["upstream_calls"] = int(calls)
        run["upstream_calls_per_request"] = round(calls / run["answered_total"], 4) if run["answered_total"] else None
    run["cpu_us_per_req"] = round((variant.service.cpu_seconds() - cpu0) / max(1, run["completed"]) * 1e6, 1)
    return run


# The cached gateway's only difference, given through the environment (the config file is the harness's, shared
# by every scenario): upstream u keeps its answers for a minute (the echo upstream sends no Cache-Control).
CACHE_ENV = {
    "GATEWAY_UPSTREAMS__U__CACHE__ENABLED": "true",
    "GATEWAY_UPSTREAMS__U__CACHE__DEFAULT_TTL_S": "60",
    "GATEWAY_UPSTREAMS__U__CACHE__MAX_BYTES": str(16 * 1024 * 1024),
}


def start(bench: Bench, upstream: str) -> dict[str, Variant]:
    spec = VARIANTS["gateway"]
    variants = {
        key: start_variant(
            spec, {"u": upstream}, cpus=bench.pinning.every, workdir=bench.workdir, tag=f"-{key}", env=env
        )
        for key, env in (("cache", CACHE_ENV), ("nocache", {}))
    }
    for variant in variants.values():
        bench.own(variant.service)
    for variant in variants.values():
        variant.service.wait_ready(timeout=90)
        variant.service.pin(bench.pinning.server)
    return variants


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    upstream = echo_upstream(bench)
    bench.say("hot keys: starting a gateway with the cache and coalescing, and one without")
    variants = start(bench, upstream)
    rounds: dict[str, list[dict[str, Any]]] = {key: [] for key in variants}
    for rnd in range(p.rounds):
        order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        for key in order:
            r = measured(bench, variants[key], p.ceiling_s, p.warmup_s)
            rounds[key].append(r)
            bench.say(
                f"  round {rnd + 1} {key}: {r['rps']:.0f} req/s, p99 {r['latency_ok_us']['p99'] / 1000:.1f} ms, "
                f"{r.get('upstream_calls_per_request')} upstream calls/request, {r['mismatches']} mismatches"
            )
    verification = generator(bench, variants["cache"].url, "--verify-against", variants["nocache"].url)
    bench.say(f"  verification: {verification['mismatches']} of {KEYS} keys answered differently")
    bench.stop(variants.values())
    result: dict[str, Any] = {"keys": KEYS, "zipf_s": ZIPF_S, "latency_ms": LATENCY_MS, "rounds": rounds,
                              "verification": verification}  # fmt: skip
    result["summary"] = {
        key: {
            "rps": spread([r["rps"] for r in runs]),
            "p99_ms": spread([r["latency_ok_us"]["p99"] / 1000 for r in runs]),
            "calls_per_request": spread(
                [r["upstream_calls_per_request"] for r in runs if r.get("upstream_calls_per_request") is not None]
            ),
            "cpu_us_per_req": spread([r["cpu_us_per_req"] for r in runs]),
            "mismatches": sum(r["mismatches"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
        for key, runs in rounds.items()
    }
    result["throughput_ratio"] = paired_ratio(
        [r["rps"] for r in rounds["cache"]], [r["rps"] for r in rounds["nocache"]]
    )
    result["calls_ratio"] = paired_ratio(
        [r.get("upstream_calls_per_request") for r in rounds["nocache"]],
        [r.get("upstream_calls_per_request") for r in rounds["cache"]],
    )
    goals(bench, result)
    return result


def goals(bench: Bench, result: dict[str, Any]) -> None:
    for ratio_key, target, what in (
        ("throughput_ratio", THROUGHPUT_GOAL, "throughput"),
        ("calls_ratio", CALLS_GOAL, "fewer upstream calls per request"),
    ):
        ratio = result.get(ratio_key)
        met = None if ratio is None else ratio["median"] >= target
        bench.goals.append(
            Goal(
                "hot keys",
                f"cache + coalescing ≥ {target:g}× {what} at Zipf s = {ZIPF_S:g} over {KEYS:,} keys",
                f"{fmt_spread(ratio, '{:.2f}')}×",
                met,
                "" if met else "measured on this machine's run; see the hot-key table",
            )
        )
    wrong = result["summary"]["cache"]["mismatches"] + result["verification"]["mismatches"]
    bench.goals.append(
        Goal(
            "hot keys",
            "no correctness loss: every answer names the key asked for, both gateways agree",
            f"{wrong} mismatched answers",
            wrong == 0,
        )
    )


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    p = bench.profile
    lines = [
        f"## Hot keys: cache and coalescing (Zipf s = {result['zipf_s']:g} over {result['keys']:,} keys, "
        f"{result['latency_ms']:g} ms upstream)",
        "",
        f"Closed loop ({p.connections} connections, {p.ceiling_s:g} s per run after {p.warmup_s:g} s of warm-up, "
        f"{p.rounds} interleaved rounds), one source per request, every answer checked against the key asked for. "
        "Upstream calls per request from the gateway's own attempt counter (warm-up included in both).",
        "",
        "| variant | req/s | p99 ms | upstream calls / request | CPU µs/req | mismatches | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"cache": "cache + coalescing", "nocache": "no cache"}
    for key, s in result["summary"].items():
        lines.append(
            f"| {labels[key]} | {fmt_spread(s['rps'])} | {fmt_spread(s['p99_ms'], '{:.1f}')} "
            f"| {fmt_spread(s['calls_per_request'], '{:.3f}')} | {fmt_spread(s['cpu_us_per_req'])} "
            f"| {s['mismatches']} | {s['errors']} |"
        )
    v = result["verification"]
    lines += [
        "",
        f"Throughput {fmt_spread(result['throughput_ratio'], '{:.2f}')}×, upstream calls per request "
        f"{fmt_spread(result['calls_ratio'], '{:.2f}')}× fewer. Verification pass: every key once through both "
        f"gateways, {v['mismatches']} answered differently, {v['errors']} errors.",
    ]
    return lines

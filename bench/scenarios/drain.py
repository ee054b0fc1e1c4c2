"""Drain: SIGTERM while the gateway serves 75 % of its ceiling (N = 4, zero-latency upstreams). The load generator
behaves as a load balancer: it polls /readyz every 100 ms and stops sending once the gateway is not ready. Every
request it did send must succeed. Also: the time from SIGTERM to the process's exit."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from bench.harness import Bench, Goal
from bench.variants import VARIANTS, aggregate_body, upstream_names

N = 4
DELAY_S = 2.0  # as a load balancer polling every 100 ms needs far less than; the default is 5 s


def run(bench: Bench) -> dict[str, Any]:
    p = bench.profile
    gateway = bench.start(
        [VARIANTS["gateway"]], upstream_names(N, bench.upstream(0)), tag="-drain", server={"drain_delay_s": DELAY_S}
    )["gateway"]
    body = bench.body_file("drain", aggregate_body(N))
    bench.closed(gateway, body, seconds=p.warmup_s)
    ceiling = bench.closed(gateway, body, seconds=p.ceiling_s)["rps"]
    rate = ceiling * 0.75
    horizon = p.drain_load_s + 30  # the generator stops long before: when /readyz stops answering 200
    argv = bench.loadgen_argv(
        gateway.url + "/aggregate", body, seconds=horizon, rate=rate, grace=15.0, readyz=gateway.url + "/readyz"
    )
    before = bench.scrape(gateway)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(p.drain_load_s + 0.5)  # load running for drain_load_s before the signal
    window = bench.gateway_window(gateway, before)  # loop lag under the load, up to the signal
    exit_s = gateway.service.terminate_and_time(timeout=60)
    code = gateway.service.returncode()
    try:
        out, err = proc.communicate(timeout=horizon + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-2000:]}")
    r: dict[str, Any] = json.loads(out)
    failed = sum(r["errors"].values()) + r["completed"] - r["ok"]
    readiness_first = r["unready_status"] == 503
    result = {
        "n": N,
        "ceiling": ceiling,
        "rate": round(rate, 1),
        "load": r,
        "failed": failed,
        "exit_s": exit_s,
        "exit_code": code,
        "readiness_first": readiness_first,
        "before_signal": window,
    }
    note = (
        "readiness answered 503 first, so the balancer stopped sending before the listener closed"
        if readiness_first
        else "the listener closed at SIGTERM without /readyz answering 503 first: no drain delay in this build"
    )
    bench.goals.append(
        Goal(
            "drain",
            "SIGTERM during 75 % load: zero failed requests",
            f"{failed} failed of {r['scheduled']}; exit after {exit_s:.2f} s (code {code})"
            if exit_s is not None
            else f"{failed} failed; no exit within 60 s",
            failed == 0,
            note,
        )
    )
    return result


def markdown(result: dict[str, Any], bench: Bench) -> list[str]:
    r = result["load"]
    exit_s = result["exit_s"]
    failures = {**r["errors"], **{k: v for k, v in r["statuses"].items() if not k.startswith("2")}}
    return [
        f"## Drain (SIGTERM at 75 % load, N = {result['n']})",
        "",
        f"Open loop at {result['rate']:.0f} req/s; the generator polls `/readyz` every 100 ms like a load balancer "
        "and stops sending once it is not 200. SIGTERM after "
        f"{bench.profile.drain_load_s:g} s of load; the gateway's config has `drain_delay_s = {DELAY_S:g}`. "
        "Loop lag p99 "
        f"under the load before the signal: {result['before_signal'].get('loop_lag_p99_ms', '–')} ms.",
        "",
        "| requests due before leaving rotation | succeeded | failed | failures by kind "
        "| /readyz when left rotation | SIGTERM → exit "
        "| exit code |",
        "|---|---|---|---|---|---|---|",
        f"| {r['scheduled']} | {r['ok']} | {result['failed']} | {failures or '–'} "
        f"| {r.get('unready_reason') or r['unready_status']} "
        f"| {f'{exit_s:.2f} s' if exit_s is not None else 'no exit in 60 s'} | {result['exit_code']} |",
    ]

"""The run's context: profile, pinned services, the load tools, measurements and the goals they are held to."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import promtext
from bench.procs import Pinning, Service, free_port, http_request
from bench.upstreams.nginx import nginx_command
from bench.variants import VARIANTS, Variant, VariantSpec, start_variant
from bench.wrk import run_wrk


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int  # interleaved rounds (A B A B ...)
    ceiling_s: float  # one closed-loop measurement
    warmup_s: float
    open_s: float  # one open-loop measurement
    fanout_ns: tuple[int, ...]
    open_loop_n: int  # fan-out width of the open-loop latency table
    latency_variants: tuple[str, ...]
    db_sizes: tuple[int, ...]
    db_s: float
    transform_mb: tuple[int, ...]
    transform_reps: int
    workers_s: float
    overload_s: float
    drain_load_s: float
    connections: int = 32
    open_warmup_s: float = 0.5  # before each open-loop measurement (connections opened, not recorded)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    fanout_variants: tuple[str, ...] = ("gateway", "gateway-asyncio", "floor", "bare", "fastapi", "threaded")


PROFILES = {
    "quick": Profile(
        "quick",
        rounds=2,
        ceiling_s=1,
        warmup_s=1,
        open_s=1,
        fanout_ns=(1, 4, 8),
        open_loop_n=4,
        latency_variants=("gateway", "floor"),
        db_sizes=(1, 4, 16, 32),
        db_s=1,
        transform_mb=(1, 64),
        transform_reps=1,
        workers_s=2,
        overload_s=6,
        drain_load_s=2,
        open_warmup_s=0.25,
    ),
    "full": Profile(
        "full",
        rounds=5,
        ceiling_s=5,
        warmup_s=2,
        open_s=8,
        fanout_ns=(1, 4, 8),
        open_loop_n=4,
        latency_variants=("gateway", "gateway-asyncio", "floor", "fastapi", "threaded"),
        db_sizes=(1, 4, 16, 32),
        db_s=5,
        transform_mb=(1, 16, 64, 256),
        transform_reps=5,
        workers_s=8,
        overload_s=30,
        drain_load_s=5,
    ),
    "smoke": Profile(
        "smoke",
        rounds=1,
        ceiling_s=1,
        warmup_s=0.3,
        open_s=1,
        fanout_ns=(1,),
        open_loop_n=1,
        latency_variants=("gateway",),
        db_sizes=(1,),
        db_s=1,
        transform_mb=(1,),
        transform_reps=1,
        workers_s=1,
        overload_s=1,
        drain_load_s=1,
        fractions=(0.5,),
        fanout_variants=("gateway", "floor", "bare"),
    ),
}


@dataclass
class Goal:
    scenario: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured in this build
    note: str = ""  # why, when it was missed or not measured
    remedy: str = ""  # what would close the gap


@dataclass
class Bench:
    profile: Profile
    workdir: Path
    tools: dict[str, str | None]
    pinning: Pinning
    say: Callable[[str], None]
    results: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _upstreams: dict[str, str] = field(default_factory=dict)
    background: dict[str, Any] = field(default_factory=dict)  # resources started ahead of their scenario

    # -- services --
    def own(self, service: Service) -> Service:
        self.stack.callback(service.stop)
        return service

    def upstream(self, latency_ms: float) -> str:
        """Base URL of an upstream with this latency (started once, on the load CPU): nginx for zero latency
        when installed, the uvloop fixed-latency server otherwise."""
        key = f"{latency_ms:g}"
        if key in self._upstreams:
            return self._upstreams[key]
        port = free_port()
        health = f"http://127.0.0.1:{port}/healthz"
        nginx = self.tools.get("nginx")
        if latency_ms == 0 and nginx:
            workdir = self.workdir / f"nginx-{port}"
            service = Service(
                "nginx",
                nginx_command(nginx, workdir, port),
                cpus=self.pinning.load,
                health_url=health,
                log_dir=self.workdir,
            )
        else:
            argv = [sys.executable, "-m", "bench.upstreams.delay", "--port", str(port), "--latency-ms", key]
            service = Service(f"delay-{key}ms", argv, cpus=self.pinning.load, health_url=health, log_dir=self.workdir)
        self.own(service.start()).wait_ready()
        self._upstreams[key] = f"http://127.0.0.1:{port}"
        return self._upstreams[key]

    def start(
        self, specs: Iterable[VariantSpec], upstreams: dict[str, str], *, unpinned: bool = False, **kw: Any
    ) -> dict[str, Variant]:
        """Start the variants side by side on the server CPU (every CPU when ``unpinned``) and wait until each is
        ready."""
        # Started on every CPU (start-up is CPU-heavy, and several variants start at once), pinned once ready.
        variants = {
            spec.key: start_variant(spec, upstreams, cpus=self.pinning.every, workdir=self.workdir, **kw)
            for spec in specs
        }
        for variant in variants.values():
            self.own(variant.service)
        for variant in variants.values():
            variant.service.wait_ready(timeout=90)
            if not unpinned:
                variant.service.pin(self.pinning.server)
        return variants

    def start_gateways(self, configs: dict[str, dict[str, Any]], *, unpinned: bool = False) -> dict[str, Variant]:
        """Several gateways with their own config sections (``{key: {"tag": ..., "compute": {...}}}``), started at
        once and waited for together."""
        spec = VARIANTS["gateway"]
        variants = {
            key: start_variant(spec, {}, cpus=self.pinning.every, workdir=self.workdir, **kw)
            for key, kw in configs.items()
        }
        for variant in variants.values():
            self.own(variant.service)
        for variant in variants.values():
            variant.service.wait_ready(timeout=90)
            if not unpinned:
                variant.service.pin(self.pinning.server)
        return variants

    def stop(self, variants: Iterable[Variant]) -> None:
        """Stop several variants at once: SIGTERM to each, then wait for each."""
        services = [v.service for v in variants]
        for service in services:
            service.signal_stop()
        for service in services:
            service.stop()

    # -- measurements --
    def scrape(self, variant: Variant) -> promtext.Samples | None:
        if variant.metrics_url is None:
            return None
        try:
            status, body, _ = http_request(variant.metrics_url)
        except OSError:
            return None  # a gateway that is gone (drain) or has no metrics listener: no window, not a crash
        return promtext.parse(body.decode()) if status == 200 else None

    def body_file(self, name: str, body: bytes) -> Path:
        path = self.workdir / f"body-{name}.bin"
        path.write_bytes(body)
        return path

    def closed(
        self,
        variant: Variant,
        body: Path,
        *,
        seconds: float,
        path: str = "/aggregate",
        connections: int | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """Closed loop (wrk, or the harness's generator when wrk is missing): throughput, errors, the variant's CPU
        per request and, for the gateway, its loop lag and source failures over the run."""
        conns = connections or self.profile.connections
        before = self.scrape(variant)
        cpu0, core0, t0 = variant.service.cpu_seconds(), self.pinning.server_busy_s(), time.monotonic()
        wrk = self.tools.get("wrk")
        if wrk:
            r = run_wrk(
                wrk,
                variant.url + path,
                body_file=body,
                seconds=seconds,
                connections=conns,
                cpus_prefix=self.pinning.prefix(self.pinning.load),
                content_type=content_type,
            )
            requests, errors, rps = r["requests"], r["errors"], r["rps"]
        else:
            g = self.loadgen(variant.url + path, body, seconds=seconds, connections=conns, content_type=content_type)
            requests = g["completed"]
            errors = g["completed"] - g["ok"] + sum(g["errors"].values())
            rps = g["goodput"]
        cpu1, core1, elapsed = variant.service.cpu_seconds(), self.pinning.server_busy_s(), time.monotonic() - t0
        out: dict[str, Any] = {
            "rps": round(rps, 1),
            "requests": requests,
            "errors": errors,
            "cpu_us_per_req": round((cpu1 - cpu0) / requests * 1e6, 1) if requests else None,
            "cpu_util": round((cpu1 - cpu0) / elapsed, 3),
            "elapsed_s": round(elapsed, 3),
            **self._interference(core1 - core0 - (cpu1 - cpu0), elapsed),
        }
        out.update(self.gateway_window(variant, before))
        return out

    def _interference(self, others_s: float, elapsed_s: float) -> dict[str, float]:
        """Share of the server CPU that other processes (not the variant) used during the run."""
        if self.pinning.server is None or elapsed_s <= 0:
            return {}
        cores = len(self.pinning.server.split(","))
        return {"others_on_server_cpu": round(max(0.0, others_s) / (elapsed_s * cores), 3)}

    def gateway_window(self, variant: Variant, before: promtext.Samples | None) -> dict[str, Any]:
        """Loop lag p99 over the window since ``before`` (from bucket deltas) and the max the gateway reports,
        plus upstream attempts that did not succeed."""
        if before is None:
            return {}
        after = self.scrape(variant)
        if after is None:
            return {}
        buckets = promtext.histogram_delta(before, after, "gateway_event_loop_lag_seconds")
        p99 = promtext.quantile(buckets, 0.99)
        lag_max = promtext.value(after, "gateway_event_loop_lag_max_seconds")
        failed = 0.0
        # Upstream attempts and named queries that did not succeed, and queries refused by a full DB queue.
        for name in ("gateway_upstream_request_duration_seconds_count", "gateway_db_query_duration_seconds_count"):
            failed += promtext.total(after, name, exclude={"outcome": "ok"})
            failed -= promtext.total(before, name, exclude={"outcome": "ok"})
        failed += promtext.total(after, "gateway_db_executor_rejected_total")
        failed -= promtext.total(before, "gateway_db_executor_rejected_total")
        return {
            "loop_lag_p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "loop_lag_max_ms": None if lag_max is None else round(lag_max * 1000, 2),
            "loop_lag_samples": int(buckets[-1][1]) if buckets else 0,
            "source_failures": int(failed),
        }

    def loadgen_argv(
        self,
        url: str,
        body: Path | None,
        *,
        seconds: float,
        rate: float | None = None,
        connections: int = 1024,
        warmup: float = 0.0,
        grace: float = 5.0,
        readyz: str | None = None,
        content_type: str = "application/json",
        fresh: bool = False,
    ) -> list[str]:
        argv = [
            *self.pinning.prefix(self.pinning.load),
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            url,
            "--duration",
            f"{seconds:g}",
            "--connections",
            str(connections),
            "--warmup",
            f"{warmup:g}",
            "--grace",
            f"{grace:g}",
            "--content-type",
            content_type,
        ]
        if body is not None:
            argv += ["--method", "POST", "--body-file", str(body)]
        if rate is not None:
            argv += ["--rate", f"{rate:.1f}"]
        if readyz is not None:
            argv += ["--readyz", readyz]
        if fresh:
            argv.append("--fresh-connections")
        return argv

    def loadgen(self, url: str, body: Path | None, *, seconds: float, **kw: Any) -> dict[str, Any]:
        argv = self.loadgen_argv(url, body, seconds=seconds, **kw)
        done = subprocess.run(argv, capture_output=True, timeout=seconds + 120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed: {done.stderr.decode(errors='replace')[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def open(
        self,
        variant: Variant,
        body: Path,
        *,
        rate: float,
        seconds: float,
        path: str = "/aggregate",
        warmup: float | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """Open loop at ``rate``: latency percentiles measured from each request's intended send time. ``kw`` goes
        to the generator (``connections``, ``fresh``)."""
        warmup = self.profile.open_warmup_s if warmup is None else warmup
        before = self.scrape(variant)
        cpu0, core0, t0 = variant.service.cpu_seconds(), self.pinning.server_busy_s(), time.monotonic()
        g = self.loadgen(variant.url + path, body, seconds=seconds, rate=rate, warmup=warmup, **kw)
        cpu1, core1, elapsed = variant.service.cpu_seconds(), self.pinning.server_busy_s(), time.monotonic() - t0
        g.update(self._interference(core1 - core0 - (cpu1 - cpu0), elapsed))
        g["cpu_us_per_req"] = round((cpu1 - cpu0) / max(1, g["completed"] + g["warmup_done"]) * 1e6, 1)
        g.update(self.gateway_window(variant, before))
        return g

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)  # between runs, so one run's backlog never spills into the next

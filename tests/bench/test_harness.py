"""The benchmark harness works end to end: a smoke run starts real upstreams and variants, loads them, and writes
its report. No timing goal is asserted here; only that every number it reports was really measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import promtext
from bench.cli import _parser
from bench.procs import Service, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_the_full_profile_is_the_default() -> None:
    assert _parser().parse_args([]).profile == "full"
    assert _parser().parse_args(["--quick"]).profile == "quick"
    assert _parser().parse_args(["--profile", "smoke"]).profile == "smoke"


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    before = promtext.parse('lag_bucket{le="0.001"} 10\nlag_bucket{le="0.01"} 10\nlag_bucket{le="+Inf"} 10\n')
    after = promtext.parse('lag_bucket{le="0.001"} 60\nlag_bucket{le="0.01"} 110\nlag_bucket{le="+Inf"} 110\n')
    buckets = promtext.histogram_delta(before, after, "lag")
    assert buckets == [(0.001, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert promtext.quantile(buckets, 0.5) == pytest.approx(0.001)
    assert promtext.quantile(buckets, 0.99) == pytest.approx(0.001 + 0.009 * 49 / 50)
    assert promtext.quantile(promtext.histogram_delta(after, after, "lag"), 0.99) is None


def test_open_loop_generator_counts_every_request(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstreams.delay", "--port", str(port), "--latency-ms", "5"]
    upstream = Service("delay", argv, cpus=None, health_url=f"http://127.0.0.1:{port}/healthz", log_dir=tmp_path)
    try:
        upstream.start().wait_ready(timeout=20)
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}/item", "--rate", "200",
             "--duration", "1", "--warmup", "0.2"],
            capture_output=True, timeout=30, check=True, cwd=ROOT,
        )  # fmt: skip
    finally:
        upstream.stop()
    result = json.loads(done.stdout)
    assert result["scheduled"] == 240  # 1.2 s at 200/s, warm-up included
    assert result["ok"] == 200  # the measured second
    assert result["errors"] == {}
    assert 5_000 <= result["latency_ok_us"]["p50"] < 1_000_000  # never below the upstream's latency


def test_fresh_connection_mode_opens_one_connection_per_request(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstreams.delay", "--port", str(port), "--latency-ms", "2"]
    upstream = Service("delay", argv, cpus=None, health_url=f"http://127.0.0.1:{port}/healthz", log_dir=tmp_path)
    try:
        upstream.start().wait_ready(timeout=20)
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}/item", "--rate", "100",
             "--duration", "1", "--fresh-connections"],
            capture_output=True, timeout=30, check=True, cwd=ROOT,
        )  # fmt: skip
    finally:
        upstream.stop()
    result = json.loads(done.stdout)
    assert result["connection_mode"] == "fresh"
    assert result["ok"] == result["scheduled"] == 100
    assert result["connections_opened"] == 100  # none reused
    assert result["connect_us"]["count"] == 100
    assert result["latency_ok_us"]["p50"] >= max(2_000, result["connect_us"]["p50"])  # the connect is in it


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smoke_run_reports_real_measurements(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "smoke", "--scenarios", "fanout", "--no-install",
         "--out", str(tmp_path / "out"), "--docs", str(docs)],
        capture_output=True, timeout=110, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    fanout = doc["results"]["fanout"]
    for key in ("gateway", "floor"):
        run = fanout["rounds"]["1"][key][0]
        assert run["rps"] > 0
        assert run["errors"] == 0
        assert run["cpu_us_per_req"] > 0
    gateway = fanout["rounds"]["1"]["gateway"][0]
    assert gateway["loop_lag_samples"] > 0  # read from the gateway's own histogram, before and after
    assert gateway["source_failures"] == 0
    open_loop = fanout["open_loop"]["rates"]["0.5"]["runs"]
    assert open_loop["gateway"]["ok"] > 0
    assert open_loop["gateway"]["latency_ok_us"]["count"] == open_loop["gateway"]["ok"]
    text = docs.read_text()
    assert "## Fan-out cost" in text
    assert doc["meta"]["machine"]["cpus_usable"] >= 1
    assert json.loads(docs.with_suffix(".json").read_text())["meta"]["profile"] == "smoke"

"""The hot-key scenario's pieces: the Zipf draws it loads with, and the echo upstream it checks answers against."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from bench.hotkeys_load import zipf_keys
from bench.procs import Service, free_port


def test_zipf_draws_follow_the_law_and_repeat_for_a_seed() -> None:
    draws = zipf_keys(1000, 1.1, 100_000, seed=7)
    assert draws == zipf_keys(1000, 1.1, 100_000, seed=7)
    assert min(draws) >= 1
    assert max(draws) <= 1000
    counts = Counter(draws)
    harmonic = sum(k**-1.1 for k in range(1, 1001))
    assert counts[1] / len(draws) == pytest.approx(1 / harmonic, rel=0.05)  # about 14 %: the hottest key
    assert counts[1] / counts[10] == pytest.approx(10**1.1, rel=0.2)


def test_the_echo_upstream_names_the_path_it_was_asked_for(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstreams.delay", "--port", str(port), "--latency-ms", "1", "--echo"]
    upstream = Service("delay-echo", argv, cpus=None, health_url=f"http://127.0.0.1:{port}/healthz", log_dir=tmp_path)
    try:
        upstream.start().wait_ready(timeout=20)
        for path in ("/item/1", "/item/999"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                assert json.loads(resp.read()) == {"key": path}
    finally:
        upstream.stop()

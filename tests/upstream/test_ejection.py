"""Outlier ejection's rules on an explicit clock, the pick's rules on a seeded generator, and the endpoint
settings: one clear line per problem, exit 2."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import OutlierPolicy, load_settings
from app.upstream.balancer import Balancer, Endpoint
from app.upstream.ejection import OutlierDetector, OutlierState
from tests.support.fleet import Clock


def eject(detector: OutlierDetector, state: OutlierState) -> float:
    """Fail ``state`` until it is ejected; how long for."""
    while not detector.failed(state, endpoints=10, ejected=0):
        pass
    assert state.ejected_until is not None
    return state.ejected_until - detector.clock()


def test_each_ejection_lasts_longer_and_a_healthy_spell_shortens_the_next() -> None:
    clock = Clock()
    detector = OutlierDetector(
        OutlierPolicy(consecutive_failures=3, base_ejection_ms=1000, max_ejection_ms=2500), clock=clock
    )
    state = OutlierState()
    for _ in range(2):
        assert not detector.failed(state, endpoints=10, ejected=0)
    detector.succeeded(state)  # a success breaks the run
    assert not detector.failed(state, endpoints=10, ejected=0)
    assert eject(detector, state) == 1.0
    clock.now += 0.5
    assert not detector.due(state, clock.now)
    clock.now += 0.5
    assert detector.due(state, clock.now)
    assert eject(detector, state) == 2.0  # again at once: twice the base
    clock.now += 2.0
    assert detector.due(state, clock.now)
    assert eject(detector, state) == 2.5  # capped by max_ejection_ms
    clock.now += 2.5
    assert detector.due(state, clock.now)
    clock.now += 2.0  # two base periods healthy: the multiplier (3) comes down by two
    assert eject(detector, state) == 2.0
    assert state.ejections == 4


@pytest.mark.parametrize(
    ("endpoints", "percent", "most"),
    [(1, 100, 0), (2, 50, 1), (3, 10, 1), (4, 50, 2), (10, 30, 3), (4, 100, 3), (5, 0, 0)],
)
def test_never_more_than_max_ejection_percent_and_never_all(endpoints: int, percent: int, most: int) -> None:
    detector = OutlierDetector(OutlierPolicy(max_ejection_percent=percent))
    assert detector.max_ejected(endpoints) == most


def test_round_robin_takes_turns_and_a_retry_skips_the_endpoint_that_failed() -> None:
    balancer = Balancer("round_robin", OutlierDetector(OutlierPolicy()))
    eps = [Endpoint(key=f"e{i}", prefix=f"http://10.0.0.{i}:80") for i in range(3)]
    balancer.replace(eps)
    picks = [balancer.pick().key for _ in range(6)]
    assert picks == ["e0", "e1", "e2", "e0", "e1", "e2"]
    assert balancer.pick(avoid=eps[0]).key == "e1"
    assert all(ep.in_flight == ep.calls for ep in eps)


def test_p2c_takes_the_less_loaded_of_two() -> None:
    balancer = Balancer("p2c", OutlierDetector(OutlierPolicy()), rng=random.Random(7))
    busy, idle = Endpoint(key="busy", prefix="http://10.0.0.1:80"), Endpoint(key="idle", prefix="http://10.0.0.2:80")
    balancer.replace([busy, idle])
    busy.in_flight = 5
    assert {balancer.pick().key for _ in range(4)} == {"idle"}  # idle climbs to 4, still under 5
    assert balancer.pick(avoid=idle) is busy  # unless a retry just failed there


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ("timeout_ms = 5", "upstreams.u: either base_url or endpoints is required"),
        ("endpoints = ['http://a:1/api']", "must be an origin only (scheme, host, port): the path goes in base_url"),
        ("endpoints = ['http://a:1', 'https://b:1']", "endpoints must all use the same scheme"),
        ("endpoints = ['http://a:1', 'http://A:1/']", "'http://A:1/' is given twice"),
        ("base_url = 'https://svc'\nendpoints = ['http://a:1']", "endpoints must use base_url's scheme"),
        ("base_url = 'http://svc'\npolicy = 'random'", "upstreams.u.policy: Input should be 'p2c' or 'round_robin'"),
        ("base_url = 'http://svc'\ndns_refresh_s = 0", "upstreams.u.dns_refresh_s: Input should be greater than 0"),
        (
            "base_url = 'http://svc'\noutlier = { max_ejection_percent = 150 }",
            "upstreams.u.outlier.max_ejection_percent",
        ),
        ("base_url = 'http://svc'\nhealth_check = { path = 'healthz' }", "must be an absolute path"),
    ],
)
def test_bad_endpoint_settings_are_named(tmp_path: Path, upstream: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f"[upstreams.u]\n{upstream}\n"), environ=False)
    assert any(problem in line for line in info.value.problems), info.value.problems


def test_check_config_exits_2_on_bad_endpoints(tmp_path: Path) -> None:
    bad = write(tmp_path, "[upstreams.u]\nendpoints = ['ftp://10.0.0.5']\n")
    res = subprocess.run([sys.executable, "-m", "app", "check-config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert lines[1:] == ["  upstreams.u.endpoints: 'ftp://10.0.0.5' is not an absolute http:// or https:// URL"]
    assert "Traceback" not in res.stderr

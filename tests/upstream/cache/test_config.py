"""Cache settings: a bad one stops the start with one line naming its key (exit 2), a good one is taken as meant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import Settings, load_settings

BASE = '[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n\n[upstreams.u.cache]\n'


@pytest.mark.parametrize(
    ("cache", "problem"),
    [
        ('enabled = true\nbackend = "redis"\n', "upstreams.u.cache.backend: 'redis' needs cache.redis_url"),
        ('backend = "memcached"\n', "upstreams.u.cache.backend: Input should be 'memory' or 'redis'"),
        ("max_bytes = 0\n", "upstreams.u.cache.max_bytes: Input should be greater than or equal to 1"),
        ("default_ttl_s = -1\n", "upstreams.u.cache.default_ttl_s: Input should be greater than or equal to 0"),
        ("stale_if_error_s = -1\n", "upstreams.u.cache.stale_if_error_s: Input should be greater than or equal"),
        ("ttl = 5\n", "upstreams.u.cache.ttl: Extra inputs are not permitted"),
    ],
)
def test_a_bad_cache_setting_is_one_line_and_exit_2(tmp_path: Path, cache: str, problem: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(BASE + cache)
    with pytest.raises(ConfigError) as exc:
        load_settings(config, environ=False)
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(problem)
    done = subprocess.run(
        [sys.executable, "-m", "app", "check-config", str(config)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert problem in done.stdout.decode() + done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


def test_defaults_and_what_they_mean() -> None:
    settings = Settings(upstreams={"u": {"base_url": "http://x"}})
    cache = settings.upstreams["u"].cache
    assert (cache.enabled, cache.coalescing, cache.active) == (False, False, False)
    on = Settings(upstreams={"u": {"base_url": "http://x", "cache": {"enabled": True}}}).upstreams["u"].cache
    assert (on.coalescing, on.backend, on.default_ttl_s, on.stale_if_error_s) == (True, "memory", 0.0, 0.0)
    alone = Settings(upstreams={"u": {"base_url": "http://x", "cache": {"coalesce": True}}}).upstreams["u"].cache
    assert (alone.enabled, alone.coalescing, alone.active) == (False, True, True)
    no_flight = {"enabled": True, "coalesce": False}
    assert not Settings(upstreams={"u": {"base_url": "http://x", "cache": no_flight}}).upstreams["u"].cache.coalescing


def test_the_shared_cache_uses_the_rate_limiters_redis_unless_given_its_own() -> None:
    shared = {"base_url": "http://x", "cache": {"enabled": True, "backend": "redis"}}
    limiter = {"backend": "redis", "redis_url": "redis://limits:6379/0"}
    settings = Settings(upstreams={"u": shared}, rate_limit=limiter)
    assert settings.cache_redis_url is not None
    assert settings.cache_redis_url.get_secret_value() == "redis://limits:6379/0"
    own = Settings(upstreams={"u": shared}, rate_limit=limiter, cache={"redis_url": "redis://cache:6379/1"})
    assert own.cache_redis_url is not None
    assert own.cache_redis_url.get_secret_value() == "redis://cache:6379/1"

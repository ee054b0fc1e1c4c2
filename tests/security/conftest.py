"""Keys for tests: real random tokens, configured by their hashes exactly as an operator would."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from app.security.keys import hash_key


@dataclass(frozen=True)
class Key:
    name: str
    secret: str
    config: dict[str, Any]

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    @property
    def header(self) -> dict[str, str]:
        return {"X-API-Key": self.secret}


def new_key(name: str, scopes: list[str], **extra: Any) -> Key:
    secret = secrets.token_urlsafe(32)
    return Key(name, secret, {"name": name, "hash": hash_key(secret), "scopes": scopes, **extra})


def auth_with(*keys: Key) -> dict[str, Any]:
    return {"enabled": True, "keys": [k.config for k in keys]}


DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis server (GATEWAY_TEST_REDIS_URL, by default the local one that `make test` starts)."""
    url = os.environ.get("GATEWAY_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        if shutil.which("redis-server") is None and "GATEWAY_TEST_REDIS_URL" not in os.environ:
            pytest.skip(
                f"NO REDIS: redis-server is not installed and {url} does not answer: "
                "the shared rate limiter is untested on this machine"
            )
        pytest.fail(f"{url} does not answer ({exc}); run scripts/ensure-redis.sh (make test does)")
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, and every key under it deleted afterwards."""
    prefix = f"gwtest:{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0

"""The drain drills' setup: a `gateway serve` config with a 200 ms upstream, a real database and a CPU worker pool,
and the request mix the load client sends."""

from __future__ import annotations

from pathlib import Path

from tests.support.load import Call

AGGREGATE_SLOW = Call(
    "aggregate",
    "POST",
    "/aggregate",
    json={
        "sources": {
            "profile": {"upstream": "slow", "path": "/users/7"},
            "orders": {"query": "recent_orders", "params": {"user_id": 7, "limit": 3}},
        },
        "deadline_ms": 5000,
    },
    check=lambda body: body["complete"] is True and len(body["results"]["orders"]["data"]) == 3,
)
AGGREGATE_DB = Call(
    "query",
    "POST",
    "/aggregate",
    json={"sources": {"tiers": {"query": "tier_counts"}}},
    check=lambda body: body["complete"] is True and len(body["results"]["tiers"]["data"]) == 3,
)
TRANSFORM = Call(
    "transform",
    "POST",
    "/transform/trig_log",
    json={"data": [0.5, 1.0, 2.0]},
    check=lambda body: len(body["result"]) == 3,
)
MIX = (AGGREGATE_SLOW, AGGREGATE_DB, TRANSFORM)


def write_config(
    tmp_path: Path,
    *,
    upstream_url: str,
    delay: float,
    timeout: float,
    workers: int = 1,
    compute: bool = True,
    name: str = "gateway.toml",
) -> Path:
    """A config for `gateway serve`; the database URL comes from GATEWAY_DATABASE_URL."""
    path = tmp_path / name
    path.write_text(f"""
[server]
drain_delay_s = {delay}
drain_timeout_s = {timeout}
log_format = "json"

[limits]
max_deadline_ms = 30000

[database]
executor_threads = 4
queue_limit = 64
min_connections = 1

[compute]
enabled = {"true" if compute else "false"}
workers = {workers}
max_tasks_per_child = 0
queue_limit = 64

[upstreams.slow]
base_url = "{upstream_url}"
timeout_ms = 30000
max_concurrency = 64
retry = {{ attempts = 1 }}

[queries.recent_orders]
sql = "SELECT id, sku, quantity FROM orders WHERE user_id = %(user_id)s ORDER BY id LIMIT %(limit)s"
params = {{ user_id = "int", limit = "int" }}

[queries.tier_counts]
sql = "SELECT tier, count(*) AS users FROM users GROUP BY tier ORDER BY tier"

[queries.sleep]
sql = "SELECT pg_sleep(%(seconds)s) AS slept"
params = {{ seconds = "float" }}
timeout_ms = 30000
""")
    return path

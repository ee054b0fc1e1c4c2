"""Every metric that the dashboard and the alert rules read is exported by the running gateway."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.manifests import contract, contract_name, metrics_used
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import UpstreamServer


async def scrape_after_traffic(pg_dsn: str, upstream: UpstreamServer) -> str:
    """/metrics of a gateway with every execution model in use, after one request through each of them."""
    settings = make_settings(
        database_url=pg_dsn,
        compute={"enabled": True, "workers": 1},
        # "users" with a cache, whose series the dashboard reads too; "pods": an upstream with several endpoints
        # (here one address standing in for a service name), whose per-endpoint series are on.
        upstreams={
            "users": {"base_url": upstream.url, "cache": {"enabled": True}},
            "pods": {"base_url": f"http://users.internal:{upstream.port}", "endpoints": [upstream.url]},
        },
        observability={"endpoint_metrics": True},
        queries={"orders_of": {"sql": "SELECT id FROM orders WHERE user_id = %(u)s", "params": {"u": "int"}}},
        # A configured key is what gateway_rate_limited_total{key} is labelled by (authentication stays off here).
        auth={"enabled": False, "keys": [{"name": "ops", "hash": "sha256:" + "ab" * 32, "scopes": ["aggregate"]}]},
    )
    sources: dict[str, Any] = {
        "profile": {"upstream": "users", "path": "/users/1"},
        "orders": {"query": "orders_of", "params": {"u": 1}},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/aggregate", json={"sources": sources}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert all(result["ok"] for result in body["results"].values()), body
        async with client.post(f"{gw.url}/transform/trig_log", json={"data": [1.0, 2.0]}) as resp:
            assert resp.status == 200, await resp.text()
        async with client.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


def exported_names(exposition: str) -> set[str]:
    """Family and sample names, so that a histogram counts by its name and by its _bucket/_count/_sum."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


async def test_every_metric_in_the_dashboard_and_alerts_is_exported(pg_dsn: str, upstream: UpstreamServer) -> None:
    exported = exported_names(await scrape_after_traffic(pg_dsn, upstream))
    assert "gateway_build_info" in exported  # the scrape itself worked
    metrics = contract()
    missing = sorted({contract_name(name, metrics) or name for name in metrics_used() if name not in exported})
    assert not missing, "read by the dashboard or the alert rules but not exported: " + " ".join(missing)

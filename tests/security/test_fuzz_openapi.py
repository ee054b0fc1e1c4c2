"""schemathesis against the gateway's own OpenAPI document: a real `gateway serve` with real upstreams and a real
database behind it, authentication on, a bounded number of examples per operation.

Every check schemathesis has runs (no 5xx, status codes, content types, headers and bodies as documented,
schema-invalid input refused, schema-valid input accepted, authentication not ignored): the document describes the
configuration served (app/aggregate/schema.py), so a request valid by it names only upstreams, queries and
composites this gateway has, with the parameters they take. The seed is fixed so that CI is repeatable; set
GATEWAY_FUZZ_SEED and GATEWAY_FUZZ_EXAMPLES to explore further.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.support import config, serve
from tests.security.conftest import metric, new_key
from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer

KEY = new_key("fuzzer", ["aggregate", "transform", "metrics"], rate={"rate_per_s": 100_000, "burst": 100_000})
# Per operation: the document lists each composite and transform as its own, so there are 11 here; 60 each keeps the
# run near the 700 requests (and the minute) it took with 7 operations at 100.
EXAMPLES = os.environ.get("GATEWAY_FUZZ_EXAMPLES", "60")
SEED = os.environ.get("GATEWAY_FUZZ_SEED", "1")
# schemathesis's CLI, with Hypothesis kept from describing filter lambdas by parsing their source file. From the
# coverage phase's deep stack, parsing schemathesis's own large module makes CPython 3.11 raise "SystemError: AST
# constructor recursion depth mismatch" (a higher recursion limit only made it rarer), which ends the run as an
# internal error: a tool's crash, not a finding about the gateway. The description only names a filter in reprs.
RUN_SCHEMATHESIS = (
    "import hypothesis.internal.lambda_sources as sources; sources.lambda_description = lambda f: 'lambda: ...'; "
    "from schemathesis.cli import schemathesis; schemathesis()"
)

# The one allowance, for one operation: a transform's body can be valid by JSON Schema and still be refused, for
# what JSON Schema cannot say (a rectangular array, an axis within the data's rank, a transform's own value check,
# the bytes of a .npy file). Those refusals are 400 (malformed .npy) and 422 (GET /transform lists each transform's
# ranks, element types and params); everything else about /transform is checked as strictly as the rest.
TRANSFORM_ALLOWANCE = """
[[operations]]
include-path-regex = "^/transform/"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "400", "401", "403", "404", "409", "422", "429", "5xx",
]
"""


@pytest.fixture
def upstreams() -> Iterator[tuple[UpstreamServer, UpstreamServer]]:
    with UpstreamServer("users") as users, UpstreamServer("inventory") as inventory:
        yield users, inventory


@pytest.fixture
def gateway(upstreams: tuple[UpstreamServer, UpstreamServer], pg_dsn: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    users, inventory = upstreams
    # The names of the examples in the document (the demo's), so that its examples do real work.
    data = config(
        auth={"enabled": True, "keys": [KEY.config]},
        compute={"enabled": True, "workers": 1},
        upstreams={
            "users": {"base_url": users.url, "forward_headers": ["x-trace"]},
            "inventory": {"base_url": inventory.url},
        },
        queries={
            "recent_orders": {
                "sql": "SELECT id, sku, quantity FROM orders WHERE user_id = %(user_id)s LIMIT %(limit)s",
                "params": {"user_id": "int", "limit": "int"},
            },
            # Every parameter type, so that each one's schema meets the gateway's strict reading of JSON.
            "orders_by_sku": {
                "sql": "SELECT id FROM orders WHERE sku = %(sku)s AND %(any)s AND quantity > %(over)s LIMIT 3",
                "params": {"sku": "str", "any": "bool", "over": "float"},
            },
        },
        composites={
            "user_overview": {
                "params": {"user_id": "int"},
                "sources": {"profile": {"upstream": "users", "path": "/users/{user_id}"}},
            },
            # A text parameter that fills a path segment, a query source fed by templates, a flat merge.
            "stock_of": {
                "params": {"sku": "str", "any": "bool", "over": "float"},
                "merge": "flat",
                "sources": {
                    "stock": {"upstream": "inventory", "path": "/stock/{sku}", "params": {"any": "{any}"}},
                    "orders": {"query": "orders_by_sku", "params": {"sku": "{sku}", "any": "{any}", "over": "{over}"}},
                },
            },
        },
    )
    with serve(tmp_path, data, env={"GATEWAY_DATABASE_URL": pg_dsn}) as gw:
        yield gw


@pytest.mark.timeout(180)
def test_the_gateway_answers_as_its_openapi_document_says(
    gateway: GatewayProcess, upstreams: tuple[UpstreamServer, UpstreamServer], tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(TRANSFORM_ALLOWANCE)
    cmd = [
        sys.executable, "-c", RUN_SCHEMATHESIS, "--config-file", str(config), "run", f"{gateway.url}/openapi.json",
        "--header", f"Authorization: Bearer {KEY.secret}",
        "--checks", "all",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", EXAMPLES, "--seed", SEED,
        "--generation-database", "none", "--workers", "2", "--request-timeout", "10",
        "--no-color", "--output-truncate", "true",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=tmp_path, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20_000:]
    assert " passed" in output
    # Valid requests did real work: upstream calls and a database query, not only refusals.
    users, inventory = upstreams
    assert users.count() > 0
    assert inventory.count() > 0
    request = urllib.request.Request(f"{gateway.url}/metrics", headers=KEY.bearer)
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    assert metric(text, "gateway_db_query_duration_seconds_count", query="recent_orders", outcome="ok") > 0
    assert metric(text, "gateway_http_requests_total", route="/transform/{name}", method="POST", status="200") > 0
    assert "Traceback" not in gateway.stderr()

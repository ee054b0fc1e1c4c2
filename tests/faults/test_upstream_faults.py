"""Real faults from real upstream servers, against a real `gateway serve` process.

Every test states what the client must see during the fault and after it. Throughout, requests that do not touch
the faulty upstream are served in full (nothing is lost), /healthz answers at once, and the gateway's log has no
traceback. Each fault has its own upstream (one breaker, one retry budget each), all on one upstream server; the
good upstream is on a server of its own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.faults.support import aggregate, config, healthz_ms, rss_mib, serve
from tests.security.conftest import metric
from tests.support.gateway import GatewayProcess
from tests.support.upstream import Behavior, UpstreamServer

FAST_RETRY = {"attempts": 2, "backoff_initial_ms": 5, "backoff_max_ms": 20}
# Every faulty upstream's breaker opens after 5 failures and probes again after 300 ms: during a fault its sources
# fail first with the fault's own type, then at once with `circuit_open`; after it, they recover within a second.
BREAKER = {"consecutive_failures": 5, "open_ms": 300}
STORM = {
    "retry": {
        "attempts": 3,
        "backoff_initial_ms": 5,
        "backoff_max_ms": 20,
        "budget_ratio": 0.1,
        "budget_min_retries": 3,
    },
    "breaker": {"consecutive_failures": 5, "open_ms": 1000},
}
UPSTREAMS = {
    "good": {},
    "hanging": {"timeout_ms": 300, "retry": FAST_RETRY, "breaker": BREAKER},
    "resetting": {"retry": {**FAST_RETRY, "attempts": 3}, "breaker": BREAKER},
    "garbage": {"retry": {"attempts": 1}, "breaker": BREAKER},
    # A timeout no loaded machine reaches: the cap is what must end these attempts.
    "big": {"max_response_bytes": 1024 * 1024, "timeout_ms": 10_000, "retry": {"attempts": 1}, "breaker": BREAKER},
    "slow": {"timeout_ms": 300, "retry": {"attempts": 1}, "breaker": BREAKER},
    "deep": {"retry": {"attempts": 1}, "breaker": BREAKER},
    "storm500": STORM,
    "storm503": STORM,
}
GOOD = {"upstream": "good", "path": "/x"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("faulty") as server:
        yield server


@pytest.fixture(scope="module")
def healthy() -> Iterator[UpstreamServer]:
    # The good upstream has a server of its own: the faulty one's thread, busy with 17 streams of 24 MiB or 17
    # hung connections on a loaded machine, must not be what makes good calls late. What is tested is the
    # gateway's isolation.
    with UpstreamServer("good") as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    upstream: UpstreamServer, healthy: UpstreamServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    upstreams = {
        name: {"base_url": f"{healthy.url if name == 'good' else upstream.url}/{name}", "max_concurrency": 64, **cfg}
        for name, cfg in UPSTREAMS.items()
    }
    data = config(upstreams=upstreams, limits={"max_deadline_ms": 10_000})
    with serve(tmp_path_factory.mktemp("faults"), data) as gw:
        yield gw


async def during_fault(
    gw: GatewayProcess, faulty: str, *, n: int = 10, deadline_ms: float = 2000
) -> tuple[list[tuple[int, Any, float]], list[float]]:
    """n requests mixing the faulty source with a good one, n requests that only touch good upstreams, and
    /healthz probes, all at once. Returns the mixed answers and the probe latencies; asserts nothing was lost."""
    async with aiohttp.ClientSession() as client:
        # One alone first, while the upstream's breaker is still closed: it meets the fault itself. Among the
        # concurrent ones that follow, the breaker may open at any moment (5 failures), so either may come back.
        first = await aggregate(client, gw, {"bad": {"upstream": faulty, "path": "/x"}, "ok": GOOD}, deadline_ms)
        mixed_tasks = [
            asyncio.create_task(
                aggregate(client, gw, {"bad": {"upstream": faulty, "path": "/x"}, "ok": GOOD}, deadline_ms)
            )
            for _ in range(n)
        ]
        clean_tasks = [asyncio.create_task(aggregate(client, gw, {"a": GOOD, "b": GOOD})) for _ in range(n)]
        probes = [await healthz_ms(client, gw) for _ in range(5)]
        mixed = [first, *await asyncio.gather(*mixed_tasks)]
        clean = await asyncio.gather(*clean_tasks)
    for status, body, _ in clean:
        assert status == 200
        assert body["complete"] is True, (body, good_outcomes(gw))
    for status, body, _ in mixed:
        assert status == 200, body
        assert body["results"]["ok"]["ok"] is True, (body, good_outcomes(gw))
    return mixed, probes


def good_outcomes(gw: GatewayProcess) -> dict[str, int]:
    """For a failure message: how the good upstream's sources ended, from the gateway's own request log."""
    outcomes: Counter[str] = Counter()
    for line in gw.stderr().splitlines():
        if line.startswith("{") and '"sources"' in line:
            sources = orjson.loads(line).get("sources", {})
            outcomes.update(s["outcome"] for name, s in sources.items() if name in ("a", "b", "ok"))
    return dict(outcomes)


async def recovered(gw: GatewayProcess, name: str, within_s: float = 5.0) -> None:
    """Once its breaker lets a probe through, the source is served again, and stays served."""
    async with aiohttp.ClientSession() as client:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            status, body, _ = await aggregate(client, gw, {"s": {"upstream": name, "path": "/x"}})
            assert status == 200
            if body["complete"]:
                break
            assert body["results"]["s"]["error"]["type"] == "circuit_open", body
            assert loop.time() < deadline, f"{name} did not recover within {within_s} s: {body}"
            await asyncio.sleep(0.05)
        for _ in range(3):
            _, body, _ = await aggregate(client, gw, {"s": {"upstream": name, "path": "/x"}})
            assert body["complete"] is True, body


def errors_of(mixed: list[tuple[int, Any, float]], kind: str) -> set[str]:
    """The error types the faulty source had: its own (the first request's, always), and circuit_open once its
    breaker opened."""
    kinds = {body["results"]["bad"]["error"]["type"] for _, body, _ in mixed}
    assert mixed[0][1]["results"]["bad"]["error"]["type"] == kind, mixed[0][1]
    assert kinds <= {kind, "circuit_open"}, kinds
    return kinds


async def test_upstream_that_hangs(gateway: GatewayProcess, upstream: UpstreamServer) -> None:
    # Client sees: 200 at once after two 300 ms attempts, the source failed with `timeout`, the rest served.
    # The hung connections are closed by the gateway, not left open. After: the source is served again.
    upstream.set("/hanging/x", Behavior(mode="hang"))
    upstream.reset_stats()
    mixed, probes = await during_fault(gateway, "hanging")
    errors_of(mixed, "timeout")
    # Two attempts when alone; later ones may get fewer (the retry budget) or meet the open breaker.
    assert mixed[0][1]["results"]["bad"]["attempts"] == 2
    assert max(elapsed for _, _, elapsed in mixed) < 1.5
    assert max(probes) < 100
    await upstream.await_disconnects(upstream.count("/hanging/x"))
    upstream.set("/hanging/x", Behavior())
    await recovered(gateway, "hanging")


async def test_upstream_that_resets_connections(gateway: GatewayProcess, upstream: UpstreamServer) -> None:
    # Client sees: 200, the source failed with `connect` after 3 attempts (a reset is transient: retried).
    upstream.set("/resetting/x", Behavior(mode="reset"))
    mixed, probes = await during_fault(gateway, "resetting")
    errors_of(mixed, "connect")
    assert max(probes) < 100
    upstream.set("/resetting/x", Behavior())
    await recovered(gateway, "resetting")


async def test_upstream_that_sends_garbage(gateway: GatewayProcess, upstream: UpstreamServer) -> None:
    # Client sees: 200, the source failed with `bad_response`; no garbage reaches the client.
    upstream.set("/garbage/x", Behavior(mode="garbage", body=b"\x00\xffHTTP/9.9 lol\r\n\r\n<html>"))
    mixed, _ = await during_fault(gateway, "garbage")
    errors_of(mixed, "bad_response")
    assert all(body["results"]["bad"]["data"] is None for _, body, _ in mixed)
    upstream.set("/garbage/x", Behavior())
    await recovered(gateway, "garbage")


# 24 MiB of JSON, sent in chunks by the upstream's "stream" mode: the headers leave at once, and the upstream's
# thread spends nothing on the bytes the gateway never reads. (Handing 17 such bodies whole to the transport, as
# "normal" does, took that thread up to 100 ms each on a loaded machine, so the last headers came after the
# attempt's timeout and the source failed with `timeout`: the test's upstream was slow, not the gateway.)
BIG_BODY = b"[" + b"1," * (12 * 1024 * 1024) + b"1]"


@pytest.mark.parametrize("declared", [True, False], ids=["content_length", "chunked"])
async def test_upstream_body_larger_than_the_cap(
    gateway: GatewayProcess, upstream: UpstreamServer, declared: bool
) -> None:
    # Client sees: 200, the source failed with `too_large`, found from the declared length or, for a chunked body,
    # from the first bytes past the cap, never from the attempt's 10 s timeout. The gateway reads no more than the
    # cap: 16 bodies of 24 MiB at once would be 384 MiB if read, its memory does not grow by anything like that,
    # and every body that reached it was cut short.
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(len(BIG_BODY))
    upstream.set("/big/x", Behavior(mode="stream", body=BIG_BODY, headers=headers))
    upstream.reset_stats()
    before = rss_mib(gateway)
    mixed, _ = await during_fault(gateway, "big", n=16, deadline_ms=10_000)
    errors_of(mixed, "too_large")
    found = "declared" if declared else "sent more than"
    assert found in mixed[0][1]["results"]["bad"]["error"]["message"], mixed[0][1]
    assert rss_mib(gateway) - before < 64, f"memory grew from {before:.0f} to {rss_mib(gateway):.0f} MiB"
    await upstream.await_disconnects(upstream.count("/big/x"))
    upstream.set("/big/x", Behavior())
    await recovered(gateway, "big")


async def test_upstream_that_sends_byte_by_byte(gateway: GatewayProcess, upstream: UpstreamServer) -> None:
    # Client sees: 200 within the attempt's 300 ms (not the 20 s the body would take), the source `timeout`.
    upstream.set("/slow/x", Behavior(mode="slow_body", body=orjson.dumps({"k": "v" * 200}), latency=0.1))
    mixed, probes = await during_fault(gateway, "slow")
    errors_of(mixed, "timeout")
    assert max(elapsed for _, _, elapsed in mixed) < 1.0
    assert max(probes) < 100
    upstream.set("/slow/x", Behavior())
    await recovered(gateway, "slow")


async def test_upstream_json_nested_too_deep(gateway: GatewayProcess, upstream: UpstreamServer) -> None:
    # Client sees: 200, the source failed with `bad_response` (encoding it would have failed the whole answer).
    upstream.set("/deep/x", Behavior(body=b"[" * 300 + b"]" * 300, headers={"Content-Type": "application/json"}))
    mixed, _ = await during_fault(gateway, "deep", n=3)
    errors_of(mixed, "bad_response")
    assert "nested deeper" in mixed[0][1]["results"]["bad"]["error"]["message"]


@pytest.mark.parametrize("status", [500, 503])
async def test_a_storm_of_errors(gateway: GatewayProcess, upstream: UpstreamServer, status: int) -> None:
    # Client sees: 200 with `upstream_status` until the breaker opens, then `circuit_open` at once, without the
    # upstream being called. A 503 is retried, but within the retry budget, so the storm is not multiplied; a
    # 500 is not retried, but counts for the breaker all the same. After the storm, the breaker's probe finds the
    # upstream healthy and every request is served again.
    name = f"storm{status}"
    upstream.set(f"/{name}/x", Behavior(status=status))
    upstream.reset_stats()
    answers: list[tuple[int, Any, float]] = []
    for _ in range(4):
        mixed, probes = await during_fault(gateway, name, n=10)
        answers += mixed
        assert max(probes) < 100
    kinds = [body["results"]["bad"]["error"]["type"] for _, body, _ in answers]
    assert set(kinds) == {"upstream_status", "circuit_open"}
    assert kinds.count("circuit_open") >= 25
    fast = [
        body["results"]["bad"]["elapsed_ms"]
        for _, body, _ in answers
        if body["results"]["bad"]["error"]["type"] == "circuit_open"
    ]
    assert max(fast) < 50  # no call is made: only the loop's own scheduling
    assert upstream.count(f"/{name}/x") <= 20, "40 requests with 3 attempts each must not become 120 calls"

    upstream.set(f"/{name}/x", Behavior())
    await recovered(gateway, name)
    async with aiohttp.ClientSession() as client, client.get(f"{gateway.url}/metrics") as resp:
        text = await resp.text()
    assert metric(text, "gateway_upstream_breaker_state", upstream=name) == 0


def test_no_traceback_in_the_log(gateway: GatewayProcess) -> None:
    assert "Traceback" not in gateway.stderr()

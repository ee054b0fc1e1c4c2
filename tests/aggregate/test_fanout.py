"""/aggregate against real upstream servers on loopback: concurrency, bounds, deadlines, partial failure."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


async def test_sources_run_concurrently(upstream: UpstreamServer) -> None:
    upstream.set("/slow", Behavior(latency=0.1, json={"v": 1}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    sources = {f"s{i}": {"upstream": "a", "path": "/slow"} for i in range(8)}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, {"warm": {"upstream": "a", "path": "/x"}})
        started = time.perf_counter()
        status, body, headers = await post_aggregate(client, gw.url, sources, deadline_ms=2000)
        elapsed = time.perf_counter() - started
    assert status == 200
    assert headers["X-Aggregate-Complete"] == "true"
    assert all(r["ok"] and r["data"] == {"v": 1} for r in body["results"].values())
    assert upstream.peak_concurrency == 8
    assert elapsed < 0.4, f"8 x 100 ms sources took {elapsed * 1000:.0f} ms: not concurrent"


async def test_upstream_never_sees_more_than_its_limit(upstream: UpstreamServer) -> None:
    upstream.set("/work", Behavior(latency=0.05))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, max_concurrency=3)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        sources = {f"s{i}": {"upstream": "a", "path": "/work"} for i in range(3)}
        # 10 clients x 3 sources = 30 concurrent calls wanted, 10x the limit.
        replies = await asyncio.gather(*(post_aggregate(client, gw.url, sources, deadline_ms=5000) for _ in range(10)))
    assert all(status == 200 and body["complete"] for status, body, _ in replies)
    assert upstream.count("/work") == 30
    assert upstream.peak_concurrency == 3


async def test_partial_failure_is_reported_per_source(upstream: UpstreamServer, upstream2: UpstreamServer) -> None:
    upstream.set("/fine", Behavior(json={"ok": 1}))
    upstream2.set("/broken", Behavior(status=500))
    upstream2.set("/missing", Behavior(status=404))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url), "b": upstream_cfg(upstream2.url)})
    sources = {
        "fine": {"upstream": "a", "path": "/fine"},
        "broken": {"upstream": "b", "path": "/broken"},
        "missing": {"upstream": "b", "path": "/missing"},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, headers = await post_aggregate(client, gw.url, sources)
    assert status == 200
    assert headers["X-Aggregate-Complete"] == "false"
    assert body["complete"] is False
    results = body["results"]
    assert results["fine"] == {**results["fine"], "ok": True, "status": 200, "data": {"ok": 1}, "error": None}
    assert results["broken"]["error"] == {"type": "upstream_status", "message": "b answered 500"}
    assert results["broken"]["status"] == 500
    assert results["broken"]["attempts"] == 1  # 500 is not transient: no retry
    assert results["missing"]["error"]["type"] == "upstream_status"
    assert results["missing"]["status"] == 404


async def test_slow_upstream_cannot_push_past_the_deadline(upstream: UpstreamServer) -> None:
    upstream.set("/slow", Behavior(latency=3.0))
    upstream.set("/fast", Behavior(json={"fast": True}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, timeout_ms=5000)})
    sources = {"slow": {"upstream": "a", "path": "/slow"}, "fast": {"upstream": "a", "path": "/fast"}}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        status, body, _ = await post_aggregate(client, gw.url, sources, deadline_ms=300)
        elapsed = time.perf_counter() - started
        await upstream.await_disconnects(1)
        registry = gw.state.require_metrics().registry
    assert status == 200
    assert body["results"]["fast"]["ok"] is True
    assert body["results"]["slow"]["error"]["type"] == "deadline"
    # Cut by the aggregate's one timer (the attempt had none of its own), and counted as the deadline's.
    attempts = "gateway_upstream_request_duration_seconds_count"
    assert registry.get_sample_value(attempts, {"upstream": "a", "outcome": "deadline"}) == 1
    assert registry.get_sample_value(attempts, {"upstream": "a", "outcome": "ok"}) == 1
    # Well under the 3 s the slow upstream takes; the margin over 300 ms is for a loaded CI machine.
    assert 0.28 < elapsed < 1.0, f"answered after {elapsed * 1000:.0f} ms for a 300 ms deadline"
    assert [r.disconnected for r in upstream.requests if r.path == "/slow"] == [True]


async def test_a_lone_source_meets_the_deadline_and_the_disconnect_as_any(upstream: UpstreamServer) -> None:
    # One source runs in the request's own task (app/aggregate/execute.py): the deadline's cancellation must
    # still become the source's `deadline` result, and a client's disconnect must still cancel its call.
    upstream.set("/slow", Behavior(latency=3.0))
    upstream.set("/hang", Behavior(mode="hang"))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, timeout_ms=10_000)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        status, body, headers = await post_aggregate(
            client, gw.url, {"slow": {"upstream": "a", "path": "/slow"}}, deadline_ms=300
        )
        elapsed = time.perf_counter() - started
        await upstream.await_disconnects(1)
        assert (status, headers["X-Aggregate-Complete"]) == (200, "false")
        assert body["results"]["slow"]["error"]["type"] == "deadline"
        assert body["results"]["slow"]["attempts"] == 1
        assert 0.28 < elapsed < 1.0, f"answered after {elapsed * 1000:.0f} ms for a 300 ms deadline"
        status, body, _ = await post_aggregate(
            client, gw.url, {"again": {"upstream": "a", "path": "/x"}}, deadline_ms=2000
        )
        assert (status, body["complete"]) == (200, True), "the request's task was not left cancelled"

        request = asyncio.create_task(
            post_aggregate(client, gw.url, {"h": {"upstream": "a", "path": "/hang"}}, deadline_ms=10_000)
        )
        await upstream.await_requests(3)  # /slow, /x and /hang
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await upstream.await_disconnects(2, timeout=5)
    assert [r.disconnected for r in upstream.requests if r.path == "/hang"] == [True]
    assert gw.state.upstreams.upstreams["a"].in_flight == 0


async def test_a_deadline_that_passes_before_the_sources_start_fails_each_of_them(upstream: UpstreamServer) -> None:
    upstream.set("/x", Behavior())
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    sources = {f"s{i}": {"upstream": "a", "path": "/x"} for i in range(4)}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        # One microsecond: gone before the source tasks run at all, or before their first call returns.
        status, body, headers = await post_aggregate(client, gw.url, sources, deadline_ms=0.001)
        later_status, later, _ = await post_aggregate(client, gw.url, sources, deadline_ms=2000)
    assert (status, headers["X-Aggregate-Complete"]) == (200, "false")
    assert list(body["results"]) == list(sources)
    assert {r["error"]["type"] for r in body["results"].values()} == {"deadline"}
    assert all(r["attempts"] == 0 and r["data"] is None for r in body["results"].values()), "nothing was sent"
    assert (later_status, later["complete"]) == (200, True), "the breaker was not blamed for the client's deadline"


async def test_a_deadline_that_passes_while_waiting_for_a_slot_counts_no_attempt(upstream: UpstreamServer) -> None:
    upstream.set("/hold", Behavior(latency=1.0))
    upstream.set("/queued", Behavior())
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, max_concurrency=1, retry={"attempts": 1})})
    sources = {"hold": {"upstream": "a", "path": "/hold"}, "queued": {"upstream": "a", "path": "/queued"}}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources, deadline_ms=300)
    hold, queued = body["results"]["hold"], body["results"]["queued"]
    assert (hold["error"]["type"], hold["attempts"]) == ("deadline", 1)
    assert (queued["error"]["type"], queued["attempts"]) == ("deadline", 0)
    assert upstream.count("/queued") == 0


async def test_deadline_is_capped_and_passed_on(upstream: UpstreamServer) -> None:
    upstream.set("/echo", Behavior())
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url)}, limits={"max_deadline_ms": 500, "default_deadline_ms": 200}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, {"e": {"upstream": "a", "path": "/echo"}}, deadline_ms=60_000)
        await post_aggregate(client, gw.url, {"e": {"upstream": "a", "path": "/echo"}})
    capped, default = (int(r.headers["x-request-deadline-ms"]) for r in upstream.requests)
    assert 400 < capped <= 500
    assert 100 < default <= 200


async def test_request_id_is_forwarded_and_echoed(upstream: UpstreamServer) -> None:
    upstream.set("/x", Behavior())
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        body = {"sources": {"x": {"upstream": "a", "path": "/x"}}}
        async with client.post(f"{gw.url}/aggregate", json=body, headers={"X-Request-ID": "abc-123"}) as resp:
            assert resp.headers["X-Request-ID"] == "abc-123"
        async with client.post(f"{gw.url}/aggregate", json=body, headers={"X-Request-ID": "bad id\u00e9"}) as resp:
            generated = resp.headers["X-Request-ID"]
    assert [r.headers["x-request-id"] for r in upstream.requests] == ["abc-123", generated]
    assert len(generated) == 32


async def test_cookies_an_upstream_sets_never_reach_another_request(upstream: UpstreamServer) -> None:
    # One client's upstream session must not ride along with the next client's call: the gateway keeps no cookie
    # jar. By host name, since a jar ignores cookies from bare IP addresses anyway.
    upstream.set("/login", Behavior(headers={"Set-Cookie": "session=alice-secret; Path=/"}))
    upstream.set("/me", Behavior())
    by_name = upstream.url.replace("127.0.0.1", "localhost")
    settings = make_settings(upstreams={"a": upstream_cfg(by_name)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, {"login": {"upstream": "a", "path": "/login"}})
        assert (status, body["complete"]) == (200, True)
        await post_aggregate(client, gw.url, {"me": {"upstream": "a", "path": "/me"}})
    (me,) = [r for r in upstream.requests if r.path == "/me"]
    assert "cookie" not in me.headers


async def test_client_disconnect_cancels_upstream_calls(upstream: UpstreamServer) -> None:
    upstream.set("/hang", Behavior(mode="hang"))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, timeout_ms=10_000)})
    sources = {f"h{i}": {"upstream": "a", "path": "/hang"} for i in range(3)}
    async with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as client:
            request = asyncio.create_task(post_aggregate(client, gw.url, sources, deadline_ms=10_000))
            await upstream.await_requests(3)
            # The gateway's protocol signals the disconnect itself: no watcher task per request.
            assert [t for t in asyncio.all_tasks() if t.get_name() == "disconnect-watcher"] == []
            request.cancel()  # the client gives up and closes its connection
            await asyncio.gather(request, return_exceptions=True)
        await upstream.await_disconnects(3, timeout=5)
        assert gw.state.upstreams.upstreams["a"].in_flight == 0
    assert all(r.disconnected for r in upstream.requests)

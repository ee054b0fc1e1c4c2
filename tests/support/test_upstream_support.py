import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.support.upstream import Behavior, UpstreamServer


# Not conftest's `upstream`: these tests need a fresh server of their own, whatever that fixture becomes.
@pytest.fixture
def server() -> Iterator[UpstreamServer]:
    with UpstreamServer("under-test") as upstream:
        yield upstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def test_default_answer_and_recorded_request(server: UpstreamServer, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{server.url}/a/b?x=1&x=2&y=3", data=b"payload", headers={"X-Request-Id": "r1"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"path": "/a/b", "ok": True}

    [request] = server.requests
    assert request.method == "POST"
    assert request.path == "/a/b"
    assert request.query == {"x": "1", "y": "3"}
    assert request.query_string == "x=1&x=2&y=3"
    assert request.headers["x-request-id"] == "r1"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.body == b"payload"
    assert request.ended is not None
    assert request.started <= request.ended
    assert not request.disconnected
    assert server.count() == server.count("/a/b") == 1
    assert server.count("/other") == 0


async def test_statuses_are_consumed_then_status_answers(
    server: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    server.set("/flaky", Behavior(statuses=[503, 502], status=201))

    seen = []
    for _ in range(4):
        async with session.get(f"{server.url}/flaky") as resp:
            seen.append(resp.status)

    assert seen == [503, 502, 201, 201]
    assert server.count("/flaky") == 4


async def test_json_body_and_headers(server: UpstreamServer, session: aiohttp.ClientSession) -> None:
    server.set("/json", Behavior(status=429, json={"slow": "down"}, headers={"Retry-After": "3"}))
    server.set("/raw", Behavior(body=b"\x00not json", headers={"X-Upstream": "yes"}))
    server.set("/empty", Behavior(status=204))

    async with session.get(f"{server.url}/json") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        assert await resp.json() == {"slow": "down"}
    async with session.get(f"{server.url}/raw") as resp:
        assert resp.headers["X-Upstream"] == "yes"
        assert resp.content_type == "application/octet-stream"
        assert await resp.read() == b"\x00not json"
    async with session.get(f"{server.url}/empty") as resp:
        assert resp.status == 204
        assert await resp.read() == b""


async def test_latency_delays_the_answer(server: UpstreamServer, session: aiohttp.ClientSession) -> None:
    server.set("/slow", Behavior(latency=0.2))

    started = time.monotonic()
    async with session.get(f"{server.url}/slow") as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.2
    [request] = server.requests
    assert request.ended is not None
    assert request.ended - request.started >= 0.2


async def test_peak_concurrency_counts_requests_inside_the_handler(
    server: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    server.set("/slow", Behavior(latency=0.2))

    async def call() -> int:
        async with session.get(f"{server.url}/slow") as resp:
            return resp.status

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(call()) for _ in range(10)]

    assert [task.result() for task in tasks] == [200] * 10
    assert server.peak_concurrency == 10
    assert server.in_flight == 0

    server.reset_stats()
    assert server.requests == []
    assert server.peak_concurrency == 0


async def test_hang_until_the_client_gives_up_records_a_disconnect(
    server: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    server.set("/hang", Behavior(mode="hang"))

    with pytest.raises(TimeoutError):
        async with session.get(f"{server.url}/hang", timeout=aiohttp.ClientTimeout(total=0.3)):
            pass

    await server.await_disconnects(1)
    [request] = server.requests
    assert request.disconnected
    assert request.ended is not None
    assert server.in_flight == 0


async def test_reset_closes_the_connection_without_a_response(
    server: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    server.set("/reset", Behavior(mode="reset"))

    # POST: aiohttp's client silently retries an idempotent request once after a disconnect (see below).
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with session.post(f"{server.url}/reset"):
            pass

    await server.await_requests(1)
    assert server.count("/reset") == 1
    [request] = server.requests
    assert not request.disconnected  # the server hung up, not the client


async def test_aiohttp_client_retries_idempotent_requests_once_after_a_reset(
    server: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    # ClientSession resends GET/HEAD/PUT/DELETE/OPTIONS/TRACE once on ServerDisconnectedError/ClientOSError,
    # with no public switch (aiohttp 3.14). Tests that count upstream attempts must allow for it.
    server.set("/reset", Behavior(mode="reset"))

    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with session.get(f"{server.url}/reset"):
            pass

    await server.await_requests(2)
    assert server.count("/reset") == 2


async def test_garbage_is_not_http(server: UpstreamServer, session: aiohttp.ClientSession) -> None:
    server.set("/garbage", Behavior(mode="garbage"))

    with pytest.raises(aiohttp.ClientResponseError, match="Bad status line"):
        async with session.get(f"{server.url}/garbage"):
            pass


async def test_slow_body_sends_one_byte_per_interval(server: UpstreamServer, session: aiohttp.ClientSession) -> None:
    server.set("/drip", Behavior(mode="slow_body", body=b"abcdefghij", latency=0.05))

    started = time.monotonic()
    async with session.get(f"{server.url}/drip") as resp:
        assert resp.status == 200  # the head comes at once
        assert time.monotonic() - started < 0.45
        assert await resp.read() == b"abcdefghij"
    assert time.monotonic() - started >= 0.5


async def test_client_leaving_a_slow_body_records_a_disconnect(
    server: UpstreamServer, session: aiohttp.ClientSession
) -> None:
    server.set("/drip", Behavior(mode="slow_body", body=b"x" * 100, latency=0.02))

    async with session.get(f"{server.url}/drip") as resp:
        assert await resp.content.readexactly(2) == b"xx"
        resp.close()  # drops the connection mid-body

    await server.await_disconnects(1)
    assert server.requests[0].disconnected


def test_blocking_waits_for_clients_in_other_threads(server: UpstreamServer) -> None:
    # urllib blocks this thread; the server answers from its own thread all the same.
    with urllib.request.urlopen(f"{server.url}/sync", timeout=10) as resp:
        assert resp.status == 200

    server.wait_for_requests(1)
    with pytest.raises(TimeoutError, match="no 2 requests"):
        server.wait_for_requests(2, timeout=0.05)
    with pytest.raises(TimeoutError, match="no 1 disconnects"):
        server.wait_for_disconnects(1, timeout=0.05)


async def test_await_times_out(server: UpstreamServer) -> None:
    with pytest.raises(TimeoutError, match="no 1 requests"):
        await server.await_requests(1, timeout=0.05)


async def test_stop_cancels_hanging_handlers_and_is_idempotent(session: aiohttp.ClientSession) -> None:
    server = UpstreamServer("stopping")
    with pytest.raises(RuntimeError):
        _ = server.url
    server.start()
    server.set("/hang", Behavior(mode="hang"))
    # POST, so aiohttp does not retry it against the closed port.
    call = asyncio.create_task(session.post(f"{server.url}/hang"))
    await server.await_requests(1)

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    server.stop()

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call
    [request] = server.requests
    assert not request.disconnected  # the server went away, not the client
    with pytest.raises(RuntimeError):
        server.start()

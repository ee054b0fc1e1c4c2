"""Every limit on what a client controls, each answered with its own 4xx problem type, none with a 500."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import UpstreamServer

LIMITS = {
    "max_headers": 20,
    "max_header_bytes": 2048,
    "max_url_bytes": 512,
    "max_query_params": 5,
    "max_json_depth": 8,
    "max_sources": 2,
    "max_body_bytes": 64 * 1024,
    "request_head_timeout_s": 0.5,
}


async def raw_request(url: str, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a hand-made request head; returns status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def gateway(upstream: UpstreamServer) -> Any:
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url)}, limits=LIMITS, compute={"enabled": True, "max_elements": 100}
    )
    async with running_gateway(settings) as gw:
        yield gw


@pytest.mark.parametrize(
    ("headers", "status", "type_"),
    [
        ({f"x-h{i}": "v" for i in range(25)}, 431, "too-many-headers"),
        ({"x-big": "v" * 3000}, 431, "headers-too-large"),
    ],
)
async def test_header_limits(gateway: Any, headers: dict[str, str], status: int, type_: str) -> None:
    async with aiohttp.ClientSession() as client, client.get(f"{gateway.url}/healthz", headers=headers) as resp:
        assert resp.status == status
        body = await resp.json(content_type=None)
        assert body["type"] == f"urn:gateway:problem:{type_}"
        assert resp.headers["Connection"] == "close"


async def test_url_and_query_limits(gateway: Any) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{gateway.url}/aggregate/c?x=" + "a" * 600) as resp:
            assert resp.status == 414
            assert (await resp.json(content_type=None))["type"] == "urn:gateway:problem:uri-too-long"
        async with client.get(f"{gateway.url}/aggregate/c?" + "&".join(f"p{i}=1" for i in range(6))) as resp:
            assert resp.status == 400
            assert (await resp.json(content_type=None))["type"] == "urn:gateway:problem:too-many-query-params"
        async with client.get(f"{gateway.url}/aggregate/c?" + "&".join(f"p{i}=1" for i in range(5))) as resp:
            assert resp.status == 404  # within the limits: on to the route, which knows no composite 'c'


def nested(depth: int) -> bytes:
    return b'{"sources": {"s": {"upstream": "a", "path": "/x", "json": ' + b"[" * depth + b"]" * depth + b"}}}"


@pytest.mark.parametrize("depth", [5, 300, 600, 30_000])
async def test_json_depth(gateway: Any, upstream: UpstreamServer, depth: int) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{gateway.url}/aggregate", data=nested(depth), headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        body = await resp.json(content_type=None)
    if depth + 3 <= LIMITS["max_json_depth"]:
        assert resp.status == 200, body
        assert upstream.count() == 1
    else:
        # Before any parser recursed; before (at 300 or 600 levels) this was a 500 from the encoder.
        assert resp.status == 400, body
        assert body["type"] == "urn:gateway:problem:json-too-deep"
        assert upstream.count() == 0


async def test_brackets_inside_strings_are_not_nesting(gateway: Any, upstream: UpstreamServer) -> None:
    text = '[[[[[[[[[[[[[[[[[[[[ \\" ]]]]'
    payload = {"sources": {"s": {"upstream": "a", "path": "/x", "json": {"note": text}}}}
    async with aiohttp.ClientSession() as client, client.post(f"{gateway.url}/aggregate", json=payload) as resp:
        assert resp.status == 200, await resp.text()
    assert upstream.requests[0].body == b'{"note":"[[[[[[[[[[[[[[[[[[[[ \\\\\\" ]]]]"}'


async def test_sources_and_transform_elements(gateway: Any) -> None:
    async with aiohttp.ClientSession() as client:
        sources = {f"s{i}": {"upstream": "a", "path": "/x"} for i in range(3)}
        async with client.post(f"{gateway.url}/aggregate", json={"sources": sources}) as resp:
            assert resp.status == 422
            body = await resp.json(content_type=None)
            assert body["type"] == "urn:gateway:problem:too-many-sources"
            assert body["errors"][0]["type"] == "too_many_sources"
        async with client.post(f"{gateway.url}/transform/trig_log", json={"data": [1.0] * 101}) as resp:
            assert resp.status == 422
            assert (await resp.json(content_type=None))["type"] == "urn:gateway:problem:too-many-elements"


async def test_body_limit_with_a_lying_content_length(gateway: Any) -> None:
    # Declares 10 bytes and sends more: the server parses by the declared length, the rest is a new request.
    status, _, _ = await raw_request(
        gateway.url,
        b"POST /aggregate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
        b"Connection: close\r\n\r\n" + b"[" * 100_000,
    )
    assert status in (400, 422)
    status, headers, _ = await raw_request(
        gateway.url,
        b"POST /aggregate HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n{}",
    )
    assert status == 413
    assert headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("size", [200_000, 20_000_000])
async def test_a_huge_head_is_refused_while_it_arrives(gateway: Any, size: int) -> None:
    # The parser would buffer any header whole; the protocol stops at the bound and still gets its answer out.
    status, headers, body = await raw_request(
        gateway.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    )
    assert status == 431
    assert headers["content-type"] == "application/problem+json"
    assert b"urn:gateway:problem:headers-too-large" in body


async def test_slow_and_silent_heads_time_out(gateway: Any) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    started = time.monotonic()
    # Silent: connects and sends nothing.
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"urn:gateway:problem:request-timeout" in answer
    # Slowloris: a byte at a time, never finishing the head.
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = b""
    for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"z" * 200:
        writer.write(bytes([byte]))
        try:
            answer = await asyncio.wait_for(reader.read(4096), timeout=0.02)
            break
        except TimeoutError:
            continue
    answer += await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 4


async def test_an_idle_kept_alive_connection_is_not_a_slow_head(gateway: Any) -> None:
    # Between requests the keep-alive timeout governs, not the head timeout.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        async with client.get(f"{gateway.url}/healthz") as resp:
            assert resp.status == 200
        await asyncio.sleep(LIMITS["request_head_timeout_s"] * 2)
        async with client.get(f"{gateway.url}/healthz") as resp:
            assert resp.status == 200

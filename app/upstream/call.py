"""One HTTP attempt against one upstream: bounded in time and in body size, errors mapped to their own types."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp
import orjson
from yarl import URL

from app.errors import (
    BadResponseError,
    ResponseTooLargeError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.security.jsondepth import exceeds_depth

_READ_CHUNK = 64 * 1024
# An upstream's JSON is embedded a few levels deep in the answer, and orjson refuses to encode past 255 levels:
# deeper bodies are a bad response, not a failed answer.
MAX_JSON_DEPTH = 200


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


async def call_once(
    session: aiohttp.ClientSession,
    *,
    upstream: str,
    method: str,
    url: URL,
    params: Mapping[str, str],
    body: Any,
    headers: Mapping[str, str],
    timeout_s: float | None,
    connect_timeout_s: float,
    max_bytes: int,
    ssl: SSLContext | bool = True,
    server_hostname: str | None = None,
) -> Reply:
    """Send one request and read its body, at most ``max_bytes`` of it.

    Raises UpstreamTimeoutError, UpstreamConnectError, ResponseTooLargeError, BadResponseError, and
    UpstreamStatusError for 5xx and 429 (callers decide whether to retry); every other status is a Reply.
    ``server_hostname``: the name the TLS handshake sends and checks when ``url`` names an address.
    ``timeout_s`` None: the caller's own timer bounds the call (its deadline); only the connection is timed here.
    """
    if timeout_s is None:
        connect_s = connect_timeout_s
        timeout = _connect_only(connect_s)
    else:
        connect_s = min(connect_timeout_s, timeout_s)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s)
    data = None if body is None else _encode(body)
    send_headers = dict(headers)
    if data is not None:
        send_headers["Content-Type"] = "application/json"
    try:
        async with session.request(
            method,
            url,
            params=params or None,  # none: the URL is used as it is, not rebuilt
            data=data,
            headers=send_headers,
            timeout=timeout,
            allow_redirects=False,  # a redirect could point anywhere; it is returned as the upstream's answer
            ssl=ssl,
            server_hostname=server_hostname,
        ) as resp:
            raw = await _read_capped(resp, upstream, max_bytes)
            status = resp.status
            reply_headers = resp.headers  # immutable and case-insensitive
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ConnectionTimeoutError) or timeout_s is None:
            message, limit_s = f"{upstream}: no connection within {connect_s * 1000:.0f} ms", connect_s
        else:
            message, limit_s = f"{upstream} did not answer within {timeout_s * 1000:.0f} ms", timeout_s
        raise UpstreamTimeoutError(message, limit_s=limit_s) from exc
    except aiohttp.ClientResponseError as exc:
        raise BadResponseError(f"{upstream} sent an invalid HTTP response: {exc.message}") from exc
    except aiohttp.ClientPayloadError as exc:
        raise BadResponseError(f"{upstream} sent a broken body: {exc}") from exc
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise UpstreamConnectError(f"{upstream}: {_connect_reason(exc)}") from exc
    if status >= 500 or status == 429:
        err = UpstreamStatusError(f"{upstream} answered {status}", status=status)
        err.retry_after = reply_headers.get("retry-after")
        raise err
    return Reply(status=status, body=raw, headers=reply_headers)


@functools.lru_cache(maxsize=64)
def _connect_only(connect_s: float) -> aiohttp.ClientTimeout:
    """A connect timeout alone, made once per value (the upstreams' connect_timeout_ms)."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s)


def _encode(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits, which JSON allows and orjson refuses to write: the standard library writes it.
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _connect_reason(exc: BaseException) -> str:
    """Why a connection failed, in words that name no host, address or port: clients see this message, and the
    upstream's address is the operator's business."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "name resolution failed"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    os_error = getattr(exc, "os_error", exc)
    # From the errno alone: the event loop's own message ("Connect call failed ('10.0.0.5', 80)") names the peer.
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno).lower()
    return type(exc).__name__


async def _read_capped(resp: aiohttp.ClientResponse, upstream: str, max_bytes: int) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise ResponseTooLargeError(
            f"{upstream} declared {declared} bytes, over the {max_bytes} byte cap", status=resp.status
        )
    if declared is not None:
        # A declared length within the cap: aiohttp reads exactly that much, and fails on a body that ends early.
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise ResponseTooLargeError(f"{upstream} sent more than the {max_bytes} byte cap", status=resp.status)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes, headers: Mapping[str, str], upstream: str) -> Any:
    """JSON bodies become values; other text stays text. Raises BadResponseError."""
    if not raw:
        return None
    ctype = headers.get("content-type", "")
    if "json" not in ctype:
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise BadResponseError(f"{upstream} sent a non-text body of type {ctype or 'unknown'}") from exc
    if exceeds_depth(raw, MAX_JSON_DEPTH):
        raise BadResponseError(f"{upstream} sent JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadResponseError(f"{upstream} sent invalid JSON: {exc}") from exc

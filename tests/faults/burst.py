"""A burst load generator, run as its own process: N connections at once, one request each, every answer timed.

    python -m tests.faults.burst --port 8080 --connections 5000 --path /aggregate --body '{...}'

Prints one JSON object: how many answers of each status, how many connections failed, and latency percentiles
(connect, and request-to-answer) by status. Raw sockets on uvloop keep the client's own cost per request small,
so that the gateway, not the client, is what the burst measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import uvloop


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit ones; tcpi_total_retrans is the 24th of those.
_TOTAL_RETRANS = struct.Struct("I")
_TOTAL_RETRANS_OFFSET = 8 + 23 * 4


def retransmitted(sock: socket.socket) -> bool:
    """Whether the kernel had to send anything on this connection again (the handshake or the request): what such
    a connection waited for is the kernel's retransmission timer, hundreds of milliseconds to seconds, which no
    server code can shorten."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return bool(_TOTAL_RETRANS.unpack_from(info, _TOTAL_RETRANS_OFFSET)[0])


async def one(
    port: int, request: bytes, start: asyncio.Event, timeout_s: float
) -> tuple[Any, float, float, bool, bool]:
    await start.wait()
    began = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connected = time.perf_counter()
            writer.write(request)
            data = await reader.read()
            answered = time.perf_counter()
            resent = retransmitted(writer.get_extra_info("socket"))
            writer.close()
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__, time.perf_counter() - began, 0.0, False, False
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    status = int(data[9:12]) if data[:5] == b"HTTP/" else "garbled"
    return status, connected - began, answered - connected, b"\r\nretry-after:" in head, resent


async def burst(args: argparse.Namespace) -> dict[str, Any]:
    body = args.body.encode()
    request = (
        f"{args.method} {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    start = asyncio.Event()
    tasks = [asyncio.create_task(one(args.port, request, start, args.timeout)) for _ in range(args.connections)]
    # One turn of the loop: every task, scheduled in order before this one resumes, runs to the gate
    # (start.wait() is its first await), so that the connections open at once.
    await asyncio.sleep(0)
    began = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    by_status: dict[str, list[float]] = defaultdict(list)
    unretransmitted: dict[str, list[float]] = defaultdict(list)
    connects: list[float] = []
    retry_after: Counter[str] = Counter()
    resent: Counter[str] = Counter()
    for status, connect_s, answer_s, has_retry_after, was_resent in results:
        by_status[str(status)].append(answer_s)
        if was_resent:
            resent[str(status)] += 1
        else:
            unretransmitted[str(status)].append(answer_s)
        if answer_s:
            connects.append(connect_s)
        if has_retry_after:
            retry_after[str(status)] += 1
    return {
        "elapsed_s": elapsed,
        "counts": {k: len(v) for k, v in by_status.items()},
        "retry_after": dict(retry_after),
        "answer_p50_ms": {k: percentile(v, 0.5) * 1000 for k, v in by_status.items()},
        "answer_p99_ms": {k: percentile(v, 0.99) * 1000 for k, v in by_status.items()},
        "answer_max_ms": {k: max(v) * 1000 for k, v in by_status.items()},
        # Connections on which the kernel had to resend the handshake or the request (a full listen queue), by status;
        # and the latency of the others, whose wait the server alone decided.
        "retransmitted": dict(resent),
        "answer_max_ms_unretransmitted": {k: max(v) * 1000 for k, v in unretransmitted.items()},
        "connect_p99_ms": percentile(connects, 0.99) * 1000,
        "connect_max_ms": max(connects, default=0.0) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--method", default="POST")
    parser.add_argument("--path", default="/aggregate")
    parser.add_argument("--body", default="{}")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))
    json.dump(uvloop.run(burst(args)), sys.stdout)


if __name__ == "__main__":
    main()

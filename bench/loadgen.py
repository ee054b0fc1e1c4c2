"""The harness's own HTTP/1.1 load generator: open loop at a fixed rate, or closed loop with fixed concurrency.

Open loop is the point: request ``i`` is due at ``start + i / rate`` whatever happened to the previous ones, and its
latency is measured from that *intended* time, not from when it was actually written. A server that stalls for
100 ms therefore shows up as 100 ms of latency for every request that was due during the stall (no coordinated
omission), even when no connection was free to send it on. Latencies go into HdrHistograms (microseconds,
3 significant digits).

Cheap per request (one pre-encoded request, a minimal response parser, uvloop) so that it can offer several
thousand requests per second from one core. Its own lateness (``send_lag``: time from a request's intended time to
the moment it was written) is reported, so a saturated generator is visible rather than blamed on the server.

Connections, in open loop, are used as a load balancer uses its pool: kept alive, one request at a time each, a new
one opened only when every open one is busy and a request is waiting, up to ``--connections``. With
``--fresh-connections`` every request gets a connection of its own instead (connect, one request with ``Connection:
close``, close), as clients without a pool do: then the server's accept path and the kernel's listen queue are on
every request's way, and a request's latency (still from its intended time) includes its connect. Connects are timed
on their own (``connect_us``), and those that fail are counted apart from those that time out.

Run as ``python -m bench.loadgen --url http://127.0.0.1:8080/aggregate --rate 500 --duration 10 ...``; prints one
JSON object on stdout. With ``--readyz URL`` it behaves like a load balancer: it polls the URL every 100 ms (a
fresh connection per probe) and stops sending new requests once it answers anything but 200.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram

MAX_LATENCY_US = 120_000_000
PROBE_INTERVAL_S = 0.1
PROBE_TIMEOUT_S = 2.0  # as a kubelet's default readiness timeout is 1 s, with room for a loaded generator
CONNECT_TIMEOUT_S = 2.0


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


def summarize(hist: HdrHistogram) -> dict[str, float | int]:
    """Percentiles in microseconds; empty histograms give zeros with count 0."""
    count = hist.get_total_count()
    if count == 0:
        return {"count": 0, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0, "mean": 0.0}
    return {
        "count": count,
        "p50": hist.get_value_at_percentile(50),
        "p90": hist.get_value_at_percentile(90),
        "p99": hist.get_value_at_percentile(99),
        "p999": hist.get_value_at_percentile(99.9),
        "max": hist.get_max_value(),
        "mean": round(hist.get_mean_value(), 1),
    }


@dataclass
class Options:
    host: str
    port: int
    request: bytes
    rate: float | None  # None: closed loop
    connections: int  # closed loop: concurrency; open loop: the most connections opened
    duration_s: float
    warmup_s: float
    grace_s: float
    readyz: tuple[str, int, str] | None = None
    fresh: bool = False  # a new connection per request (open loop only)


@dataclass
class Results:
    ok: HdrHistogram = field(default_factory=new_histogram)  # 2xx, measured window only
    shed: HdrHistogram = field(default_factory=new_histogram)  # 503
    everything: HdrHistogram = field(default_factory=new_histogram)  # all outcomes, failures at their time
    send_lag: HdrHistogram = field(default_factory=new_histogram)
    connect: HdrHistogram = field(default_factory=new_histogram)  # from the start of a connect to its completion
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    scheduled: int = 0
    ok_in_window: int = 0  # 2xx answers that arrived before the measured window ended (goodput)
    sent: int = 0
    warmup_done: int = 0
    retry_after_on_503: int = 0
    not_sent_unready: int = 0
    unready_at_s: float | None = None
    unready_status: int | None = None  # what /readyz answered when the instance left the rotation (0: nothing)
    unready_reason: str | None = None  # that status, or the error when nothing answered
    connections_opened: int = 0


@dataclass(slots=True)
class Pending:
    intended: float  # time.perf_counter()
    measured: bool  # False during warm-up


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (no pipelining)."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current: Pending | None = None
        self.remaining: int | None = None  # body bytes still expected; None while reading the head
        self.chunked = False
        self.status = 0
        self.close_after = False
        self.retry_after = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def send(self, item: Pending) -> None:
        assert self.transport is not None
        self.current = item
        self.gen.results.sent += 1
        if item.measured:
            lag = time.perf_counter() - item.intended
            self.gen.results.send_lag.record_value(max(1, int(lag * 1e6)))
        self.transport.write(self.gen.opts.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except ValueError:
            self.gen.fail(self, "bad_response")
            self._abort()

    def _parse(self) -> None:
        while self.current is not None:
            if self.remaining is None and not self.chunked:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                self.status = int(head[9:12])
                self.close_after = b"\r\nconnection: close" in head
                self.retry_after = b"\r\nretry-after:" in head
                if b"\r\ntransfer-encoding: chunked" in head:
                    self.chunked = True
                else:
                    at = head.find(b"\r\ncontent-length:")
                    if at < 0:
                        self.remaining = 0 if self.status in (204, 304) else -1
                    else:
                        stop = head.find(b"\r\n", at + 2)
                        self.remaining = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if self.chunked:
                if not self._consume_chunks():
                    return
            else:
                assert self.remaining is not None
                if self.remaining < 0:  # body until close: only finishes in connection_lost
                    return
                if len(self.buf) < self.remaining:
                    return
                del self.buf[: self.remaining]
            self._finish()

    def _consume_chunks(self) -> bool:
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(self.buf[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return False
                del self.buf[: trailer_end + 4]
                self.chunked = False
                return True
            if len(self.buf) < line_end + 2 + size + 2:
                return False
            del self.buf[: line_end + 2 + size + 2]

    def _finish(self) -> None:
        item, self.current = self.current, None
        self.remaining = None
        assert item is not None
        self.gen.done(item, self.status, self.retry_after)
        if self.close_after or self.gen.opts.fresh:
            self._abort()
        else:
            self.gen.idle(self)

    def _abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.current is not None:
            if self.remaining is not None and self.remaining < 0:
                self._finish()  # a body delimited by the close
            else:
                self.gen.fail(self, "reset" if exc is not None else "closed")
        self.gen.gone(self)


class Generator:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.results = Results()
        self.loop = asyncio.get_running_loop()
        self.idle_conns: list[Connection] = []
        self.conns: set[Connection] = set()
        self.connecting = 0
        self.queue: collections.deque[Pending] = collections.deque()
        self.outstanding = 0
        self.drained = asyncio.Event()
        self.stop_sending = False
        self.closed_loop_end = 0.0
        self.measure_from = 0.0
        self.window_end = float("inf")

    # -- bookkeeping called by connections --
    def done(self, item: Pending, status: int, retry_after: bool) -> None:
        self.outstanding -= 1
        now = time.perf_counter()
        latency_us = max(1, int((now - item.intended) * 1e6))
        if item.measured:
            r = self.results
            if 200 <= status < 300 and now <= self.window_end:
                r.ok_in_window += 1
            r.statuses[status] += 1
            r.everything.record_value(min(latency_us, MAX_LATENCY_US))
            if 200 <= status < 300:
                r.ok.record_value(min(latency_us, MAX_LATENCY_US))
            elif status == 503:
                r.shed.record_value(min(latency_us, MAX_LATENCY_US))
                r.retry_after_on_503 += int(retry_after)
        else:
            self.results.warmup_done += 1
        self._maybe_drained()

    def fail(self, conn: Connection, kind: str) -> None:
        item, conn.current = conn.current, None
        if item is None:
            return
        self._failed(item, kind)

    def _failed(self, item: Pending, kind: str) -> None:
        self.outstanding -= 1
        if item.measured:
            self.results.errors[kind] += 1
            latency_us = max(1, int((time.perf_counter() - item.intended) * 1e6))
            self.results.everything.record_value(min(latency_us, MAX_LATENCY_US))
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self.stop_sending and self.outstanding == 0:
            self.drained.set()

    def idle(self, conn: Connection) -> None:
        if self.opts.rate is None:
            now = time.perf_counter()
            if now < self.closed_loop_end and not self.stop_sending:
                self.outstanding += 1
                self.results.scheduled += 1
                conn.send(Pending(now, now >= self.measure_from))
            return
        if self.queue:
            conn.send(self.queue.popleft())
        else:
            self.idle_conns.append(conn)

    def gone(self, conn: Connection) -> None:
        self.conns.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle_conns.remove(conn)
        if self.opts.rate is None and not self.stop_sending:
            self._open_more(1)
        elif self.queue:
            self._open_more(len(self.queue))

    # -- sending --
    def submit(self, item: Pending) -> None:
        self.outstanding += 1
        self.results.scheduled += 1
        while self.idle_conns:
            conn = self.idle_conns.pop()
            if not conn.lost:
                conn.send(item)
                return
        self.queue.append(item)
        self._open_more(len(self.queue))

    def _open_more(self, wanted: int) -> None:
        while self.connecting < wanted and len(self.conns) + self.connecting < self.opts.connections:
            self.connecting += 1
            self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        started = time.perf_counter()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: Connection(self), self.opts.host, self.opts.port),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            self.connecting -= 1
            if self.queue:  # nowhere to send it: the oldest waiting request fails
                # TimeoutError is an OSError too: the handshake never completed (SYNs dropped, not refused).
                self._failed(self.queue.popleft(), "connect_timeout" if isinstance(exc, TimeoutError) else "connect")
            return
        self.connecting -= 1
        self.results.connect.record_value(min(MAX_LATENCY_US, max(1, int((time.perf_counter() - started) * 1e6))))
        self.results.connections_opened += 1
        self.conns.add(conn)
        self.idle(conn)

    async def run(self) -> None:
        opts = self.opts
        prober = asyncio.create_task(self._probe()) if opts.readyz is not None else None
        start = time.perf_counter() + 0.05
        self.measure_from = start + opts.warmup_s
        end = self.measure_from + opts.duration_s
        self.window_end = end
        if opts.rate is None:
            self.closed_loop_end = end
            self._open_more(opts.connections)
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
        else:
            await self._open_loop(start, end, opts.rate)
        self.stop_sending = True
        self._maybe_drained()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained.wait(), opts.grace_s)
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
        self._give_up()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)

    async def _open_loop(self, start: float, end: float, rate: float) -> None:
        interval = 1.0 / rate
        i = 0
        # Enough connections for the expected concurrency at a couple of milliseconds each, opened up front (none
        # with a connection per request: each request's connect is part of its latency).
        if not self.opts.fresh:
            self._open_more(min(self.opts.connections, max(4, int(rate * 0.004) + 2)))
        while not self.stop_sending:
            due = start + i * interval
            if due >= end:
                return
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while due <= now and due < end and not self.stop_sending:
                self.submit(Pending(due, due >= self.measure_from))
                i += 1
                due = start + i * interval
        # Stopped by the readiness probe: what would have been sent is rerouted, not failed.
        self.results.not_sent_unready = max(0, int((end - start) * rate) - i)

    def _give_up(self) -> None:
        for item in self.queue:
            self._failed(item, "unfinished")
        self.queue.clear()
        for conn in list(self.conns):
            if conn.current is not None:
                self.fail(conn, "unfinished")

    async def _probe(self) -> None:
        assert self.opts.readyz is not None
        host, port, path = self.opts.readyz
        started = time.perf_counter()
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        while True:
            status, reason = 0, ""
            try:
                status = await asyncio.wait_for(_probe_once(host, port, request), PROBE_TIMEOUT_S)
                reason = str(status)
            except (OSError, TimeoutError, ValueError) as exc:
                reason = type(exc).__name__
            if status != 200:
                self.results.unready_at_s = round(time.perf_counter() - started, 3)
                self.results.unready_status = status
                self.results.unready_reason = reason
                self.stop_sending = True
                self._maybe_drained()
                return
            await asyncio.sleep(PROBE_INTERVAL_S)


async def _probe_once(host: str, port: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        line = await reader.readline()
        return int(line[9:12])
    finally:
        writer.close()


def build_request(
    method: str, host: str, port: int, path: str, body: bytes, content_type: str | None, *, close: bool = False
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: bench-loadgen"]
    if close:
        lines.append("Connection: close")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
        if content_type:
            lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _split(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"only http:// URLs: {url}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


def report(opts: Options, r: Results) -> dict[str, Any]:
    measured = opts.duration_s
    ok = sum(n for status, n in r.statuses.items() if 200 <= status < 300)
    return {
        "mode": "closed" if opts.rate is None else "open",
        "connection_mode": "fresh" if opts.fresh else "keep-alive",
        "offered_rate": opts.rate,
        "connections": opts.connections,
        "duration_s": measured,
        "scheduled": r.scheduled,
        "warmup_done": r.warmup_done,
        "sent": r.sent,
        "ok": ok,
        "ok_in_window": r.ok_in_window,
        # Answers that arrived within the measured window: what the server delivered, not what it owed.
        "goodput": round(r.ok_in_window / measured, 1) if measured > 0 else 0.0,
        "completed": sum(r.statuses.values()),
        "statuses": {str(k): v for k, v in sorted(r.statuses.items())},
        "errors": dict(r.errors),
        "retry_after_on_503": r.retry_after_on_503,
        "latency_ok_us": summarize(r.ok),
        "latency_503_us": summarize(r.shed),
        "latency_all_us": summarize(r.everything),
        "send_lag_us": summarize(r.send_lag),
        "connect_us": summarize(r.connect),
        "connections_opened": r.connections_opened,
        "not_sent_unready": r.not_sent_unready,
        "unready_at_s": r.unready_at_s,
        "unready_status": r.unready_status,
        "unready_reason": r.unready_reason,
    }


async def _main(opts: Options) -> dict[str, Any]:
    gen = Generator(opts)
    await gen.run()
    return report(opts, gen.results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--body-file", help="request body, read once")
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--rate", type=float, help="requests per second (open loop); omit for closed loop")
    p.add_argument("--connections", type=int, default=64, help="closed loop: concurrency; open loop: cap")
    p.add_argument("--duration", type=float, required=True, help="measured seconds")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds before measuring (not recorded)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to wait for late answers")
    p.add_argument("--readyz", help="behave like a load balancer polling this URL")
    p.add_argument(
        "--fresh-connections", action="store_true", help="open loop: a new connection per request, closed after it"
    )
    args = p.parse_args(argv)
    if args.fresh_connections and args.rate is None:
        raise SystemExit("--fresh-connections needs --rate (open loop)")
    if args.duration <= 0 or args.duration > 600 or (args.rate is not None and not 0 < args.rate <= 100_000):
        raise SystemExit("duration must be in (0, 600] s and rate in (0, 100000]")
    host, port, path = _split(args.url)
    body = b""
    if args.body_file:
        with open(args.body_file, "rb") as fh:
            body = fh.read()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    opts = Options(
        host=host,
        port=port,
        request=build_request(args.method, host, port, path, body, args.content_type, close=args.fresh_connections),
        rate=args.rate,
        connections=max(1, args.connections),
        duration_s=args.duration,
        warmup_s=args.warmup,
        grace_s=args.grace,
        readyz=_split(args.readyz) if args.readyz else None,
        fresh=args.fresh_connections,
    )
    import uvloop

    result = uvloop.run(_main(opts))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

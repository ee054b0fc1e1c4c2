"""A fixed-latency upstream: a bare asyncio protocol on uvloop that answers every request after exactly
``--latency-ms`` (a loop timer per request; no framework, no parsing beyond what HTTP/1.1 keep-alive needs).

    python -m bench.upstreams.delay --port 9001 --latency-ms 20

``GET /healthz`` answers at once. Everything else answers 200 with a small JSON object after the latency; with
``--echo``, an object naming the request's path (``{"key": "/item/7"}``), so that an answer given for the wrong
request shows (the hot-key scenario checks every one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from bench.upstreams import BODY

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def echo_response(head: bytes) -> bytes:
    path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
    body = b'{"key":"' + path.replace(b"\\", b"").replace(b'"', b"") + b'"}'
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Handler(asyncio.Protocol):
    def __init__(self, latency_s: float, echo: bool = False) -> None:
        self.latency_s = latency_s
        self.echo = echo
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.body_left = 0
        self.queue: list[tuple[bytes, bool]] = []  # answers owed, in order (pipelined requests keep their order)
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.body_left:
                take = min(self.body_left, len(self.buf))
                del self.buf[:take]
                self.body_left -= take
                if self.body_left:
                    return
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                self.body_left = int(head[at + 17 : stop if stop >= 0 else len(head)])
            close = b"\r\nconnection: close" in head
            response = echo_response(head) if self.echo else RESPONSE
            if head.startswith(b"get /healthz "):
                self._answer(HEALTHY, close)
            elif self.latency_s > 0:
                self.loop.call_later(self.latency_s, self._answer, response, close)
            else:
                self._answer(response, close)

    def _answer(self, response: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        if close:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, latency_s: float, echo: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Handler(latency_s, echo), host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upstreams.delay")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--echo", action="store_true", help='answer {"key": <path>}')
    args = p.parse_args()
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, args.latency_ms / 1000, args.echo))


if __name__ == "__main__":
    main()

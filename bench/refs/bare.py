"""The bare stack: the gateway's own stack with none of the gateway. uvicorn (uvloop, httptools, no access log)
serving a bare ASGI callable that does the floor's fan-out: one shared aiohttp ``ClientSession`` without connection
limits, ``asyncio.gather`` over the sources, orjson. No framework, limits, deadlines, retries, breakers, metrics or
logs. The gateway's distance from it is what its own per-request work costs; the floor's distance from it is what
uvicorn's ASGI costs against aiohttp's own server."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
import uvicorn
from aiohttp import ClientSession, TCPConnector
from starlette.types import Message, Receive, Scope, Send

_JSON = [(b"content-type", b"application/json")]


class Bare:
    def __init__(self, upstreams: dict[str, str]) -> None:
        self.upstreams = upstreams
        self.session: ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] == "/aggregate":
                await self._answer(send, 200, await self._aggregate(await _body(receive)))
            elif scope["path"] == "/healthz":
                await self._answer(send, 200, b'{"status":"ok"}')
            else:
                await self._answer(send, 404, b'{"detail":"not found"}')

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = ClientSession(connector=TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _aggregate(self, raw: bytes) -> bytes:
        session = self.session
        assert session is not None
        bases = self.upstreams

        async def one(spec: dict[str, Any]) -> dict[str, Any]:
            async with session.get(bases[spec["upstream"]] + spec["path"]) as resp:
                return {"ok": resp.status < 300, "status": resp.status, "data": orjson.loads(await resp.read())}

        sources: dict[str, Any] = orjson.loads(raw)["sources"]
        results = await asyncio.gather(*(one(spec) for spec in sources.values()))
        return orjson.dumps({"results": dict(zip(sources, results, strict=True))})

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        headers = [*_JSON, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes:
    message: Message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the usual case: the whole body in one message
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.refs.bare")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstreams", required=True, help="JSON: upstream name -> base URL")
    args = p.parse_args()
    uvicorn.run(
        Bare(orjson.loads(args.upstreams)),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()

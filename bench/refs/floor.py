"""The floor: the least Python can reasonably do for the same fan-out. An aiohttp web server, one shared
``ClientSession`` without connection limits, ``asyncio.gather`` over the sources, orjson, uvloop. No limits,
deadlines, retries, breakers, metrics or logs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import orjson
import uvloop
from aiohttp import ClientSession, TCPConnector, web

UPSTREAMS = web.AppKey("upstreams", dict)
SESSION = web.AppKey("session", ClientSession)


async def aggregate(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    bases: dict[str, str] = request.app[UPSTREAMS]
    session = request.app[SESSION]

    async def one(spec: dict[str, Any]) -> dict[str, Any]:
        async with session.get(bases[spec["upstream"]] + spec["path"]) as resp:
            return {"ok": resp.status < 300, "status": resp.status, "data": orjson.loads(await resp.read())}

    sources: dict[str, Any] = body["sources"]
    results = await asyncio.gather(*(one(spec) for spec in sources.values()))
    payload = orjson.dumps({"results": dict(zip(sources, results, strict=True))})
    return web.Response(body=payload, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(port: int, upstreams: dict[str, str]) -> None:
    app = web.Application()
    app[UPSTREAMS] = upstreams
    app.router.add_post("/aggregate", aggregate)
    app.router.add_get("/healthz", healthz)
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        app[SESSION] = session
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        try:
            await asyncio.Event().wait()  # until SIGTERM (handle_signals) cancels the run
        finally:
            await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.refs.floor")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstreams", required=True, help="JSON: upstream name -> base URL")
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        uvloop.run(serve(args.port, orjson.loads(args.upstreams)))


if __name__ == "__main__":
    main()

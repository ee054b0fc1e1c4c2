"""For comparison with the gateway's process pool: the same kind of pure-Python CPU work run in a thread of the
serving process (``loop.run_in_executor`` with a ThreadPoolExecutor), where it holds the GIL against the event loop.
The loop's lag is measured exactly as the gateway measures its own (the same sampler and buckets) and served on
``/metrics``.

``POST /work?iterations=N`` runs ``kernel(N)``: a pure-Python loop, about 50 ns per iteration on a modern core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from app.observability.looplag import LoopLagSampler
from app.observability.metrics import LOOP_LAG_BUCKETS

POOL = web.AppKey("pool", ThreadPoolExecutor)
REGISTRY = web.AppKey("registry", CollectorRegistry)


def kernel(iterations: int) -> float:
    total = 0.0
    x = 0.5
    for i in range(iterations):
        x = (x * 1.000001 + i) % 1000.0
        total += x * x
    return total


async def work(request: web.Request) -> web.Response:
    iterations = min(int(request.query.get("iterations", "1000000")), 100_000_000)
    await request.read()
    result = await asyncio.get_running_loop().run_in_executor(request.app[POOL], kernel, iterations)
    return web.json_response({"result": result})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY]), content_type="text/plain")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(port: int, threads: int) -> None:
    registry = CollectorRegistry()
    lag = Histogram("gateway_event_loop_lag_seconds", "Loop lag.", buckets=LOOP_LAG_BUCKETS, registry=registry)
    sampler = LoopLagSampler(lag, interval_s=0.1)
    app = web.Application()
    app[REGISTRY] = registry
    app.router.add_post("/work", work)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        app[POOL] = pool
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await sampler.start()
        try:
            await asyncio.Event().wait()
        finally:
            await sampler.aclose()
            await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.refs.gil_thread")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        uvloop.run(serve(args.port, args.threads))


if __name__ == "__main__":
    main()

"""Demo upstream services that `gateway demo` starts, one process per service.

Each service answers with small deterministic JSON after an injected latency, and fails at an injected rate,
so the gateway's timeouts, retries and breakers have something to act on.

    python -m app.demo.upstream --name users --port 0 --latency-ms 20 --jitter-ms 5 --failure-rate 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

DEFAULT_HOST = "127.0.0.1"
# In-flight requests get this long to finish after SIGTERM before they are cancelled.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
USER_COUNT = 20

_FIRST_NAMES = (
    "Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Margaret", "Dennis", "Frances", "Ken",
    "Radia", "John", "Hedy", "Tim", "Katherine", "Linus", "Sophie", "Guido", "Shafi", "Niklaus",
)  # fmt: skip
_LAST_NAMES = (
    "Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Ritchie", "Allen", "Thompson",
    "Perlman", "McCarthy", "Lamarr", "Berners-Lee", "Johnson", "Torvalds", "Wilson", "van Rossum",
    "Goldwasser", "Wirth",
)  # fmt: skip
_TIERS = ("free", "pro", "enterprise")
_WAREHOUSES = ("ams-1", "fra-2", "iad-1", "sin-3", "syd-1")


@dataclass(frozen=True, slots=True)
class _Faults:
    latency_ms: float
    jitter_ms: float
    failure_rate: float
    rng: random.Random


_NAME_KEY = web.AppKey("upstream_name", str)
_FAULTS_KEY = web.AppKey("upstream_faults", _Faults)


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def user_record(user_id: int) -> dict[str, Any] | None:
    """The demo user with this id, or None outside 1..USER_COUNT."""
    if not 1 <= user_id <= USER_COUNT:
        return None
    first, last = _FIRST_NAMES[user_id - 1], _LAST_NAMES[user_id - 1]
    return {
        "id": user_id,
        "name": f"{first} {last}",
        "email": f"{first}.{last}@example.com".lower().replace(" ", ""),
        "tier": _TIERS[user_id % len(_TIERS)],
    }


def stock_record(sku: str) -> dict[str, Any]:
    """Deterministic stock level for any SKU (crc32 rather than hash(), which is salted per process)."""
    digest = zlib.crc32(sku.encode())
    return {"sku": sku, "available": digest % 100, "warehouse": _WAREHOUSES[(digest >> 8) % len(_WAREHOUSES)]}


async def _get_user(request: web.Request) -> web.Response:
    raw_id = request.match_info["id"]
    user = user_record(int(raw_id)) if raw_id.isdecimal() else None
    if user is None:
        return _json({"error": "user not found", "id": raw_id}, status=404)
    return _json(user)


async def _list_users(request: web.Request) -> web.Response:
    return _json([user_record(user_id) for user_id in range(1, USER_COUNT + 1)])


async def _stock_by_query(request: web.Request) -> web.Response:
    sku = request.query.get("sku", "")
    if not sku:
        return _json({"error": "missing query parameter: sku"}, status=400)
    return _json(stock_record(sku))


async def _stock_by_path(request: web.Request) -> web.Response:
    return _json(stock_record(request.match_info["sku"]))


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "service": request.app[_NAME_KEY]})


async def _echo(request: web.Request) -> web.Response:
    query: dict[str, str | list[str]] = {}
    for key in dict.fromkeys(request.query):  # unique keys, in order
        values = request.query.getall(key)
        query[key] = values[0] if len(values) == 1 else values
    # Only headers a gateway adds or propagates: shows what was forwarded, without Host/Accept noise.
    headers = {
        name.lower(): value
        for name, value in request.headers.items()
        if name.lower().startswith("x-") or name.lower() == "traceparent"
    }
    return _json(
        {
            "service": request.app[_NAME_KEY],
            "method": request.method,
            "path": request.path,
            "query": query,
            "headers": headers,
        }
    )


@web.middleware
async def _inject_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/health":
        return await handler(request)
    faults = request.app[_FAULTS_KEY]
    delay_ms = faults.latency_ms + faults.rng.uniform(-faults.jitter_ms, faults.jitter_ms)
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)
    if faults.failure_rate > 0 and faults.rng.random() < faults.failure_rate:
        return _json({"error": "injected failure"}, status=503)
    return await handler(request)


def create_upstream_app(
    *,
    name: str,
    latency_ms: float = 0,
    jitter_ms: float = 0,
    failure_rate: float = 0.0,
    seed: int | None = None,
) -> web.Application:
    """Build the demo service called `name` ("users", "inventory", or any other name for health/echo only).

    Raises ValueError for a negative latency or jitter, or a failure rate outside [0, 1].
    """
    if latency_ms < 0 or jitter_ms < 0:
        raise ValueError("latency_ms and jitter_ms must be >= 0")
    if not 0.0 <= failure_rate <= 1.0:
        raise ValueError("failure_rate must be between 0 and 1")
    app = web.Application(middlewares=[_inject_faults])
    app[_NAME_KEY] = name
    app[_FAULTS_KEY] = _Faults(latency_ms, jitter_ms, failure_rate, random.Random(seed))
    app.router.add_get("/health", _health)
    app.router.add_route("*", "/echo", _echo)
    if name == "users":
        app.router.add_get("/users", _list_users)
        app.router.add_get("/users/{id}", _get_user)
    elif name == "inventory":
        app.router.add_get("/stock", _stock_by_query)
        app.router.add_get("/stock/{sku}", _stock_by_path)
    return app


def _write_port_file(path: Path, port: int) -> None:
    # Write then rename, so a poller never reads an empty or partial file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(app: web.Application, *, name: str, host: str, port: int, port_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers go in before binding, so a SIGTERM sent as soon as the port file appears is always graceful.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port: int = runner.addresses[0][1]
        if port_file is not None:
            _write_port_file(port_file, bound_port)  # a few bytes, once, at start-up
        print(f"upstream {name} listening on {_format_url(host, bound_port)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m app.demo.upstream", description="Run one demo upstream service.")
    parser.add_argument("--name", required=True, help='service kind: "users", "inventory", or any name')
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here")
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    parser, args = _parse_args(argv)
    try:
        app = create_upstream_app(
            name=args.name,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            failure_rate=args.failure_rate,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(app, name=args.name, host=args.host, port=args.port, port_file=args.port_file))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers are installed: still a clean exit.
        pass


if __name__ == "__main__":
    main()

"""Closed-loop load over Zipf-distributed keys, every answer checked: the hot-key scenario's generator.

Each of ``--connections`` workers sends ``POST /aggregate`` with one source, ``/item/<k>`` on upstream ``u``, where
``k`` follows a Zipf law of exponent ``--zipf-s`` over ``--keys`` keys (key 1 the hottest), drawn from a seeded
generator so that every variant sees the same sequence. The upstream echoes the path (``bench.upstreams.delay
--echo``): an answer naming another key than the one asked for is a *mismatch*, counted apart from errors.

    python -m bench.hotkeys_load --url http://127.0.0.1:8080 --duration 5 --connections 32
    python -m bench.hotkeys_load --url http://127.0.0.1:8080 --verify-against http://127.0.0.1:8081

The second form is the verification pass: every key once through both gateways, the answers compared.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
import numpy as np
import orjson

from bench.loadgen import new_histogram, summarize


def zipf_keys(keys: int, s: float, count: int, seed: int) -> list[int]:
    """``count`` draws from a Zipf law of exponent ``s`` over 1..``keys`` (a finite support, unlike numpy.zipf)."""
    ranks = np.arange(1, keys + 1, dtype=np.float64)
    weights = ranks**-s
    rng = np.random.default_rng(seed)
    return [int(k) for k in rng.choice(np.arange(1, keys + 1), size=count, p=weights / weights.sum())]


def body(key: int) -> bytes:
    return orjson.dumps({"sources": {"s": {"upstream": "u", "path": f"/item/{key}"}}})


async def ask(client: aiohttp.ClientSession, url: str, key: int) -> tuple[bool, Any]:
    """(answered, data): answered is a 200 with an ok source; data is what it held."""
    async with client.post(f"{url}/aggregate", data=body(key), headers={"Content-Type": "application/json"}) as resp:
        raw = await resp.read()
    if resp.status != 200:
        return False, None
    result = orjson.loads(raw)["results"]["s"]
    return bool(result["ok"]), result["data"]


async def load(args: argparse.Namespace) -> dict[str, Any]:
    draws = zipf_keys(args.keys, args.zipf_s, 200_000, args.seed)
    hist = new_histogram()
    counts = {"completed": 0, "ok": 0, "mismatches": 0, "errors": 0, "answered_total": 0}
    next_draw = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration

    async def worker(client: aiohttp.ClientSession) -> None:
        nonlocal next_draw
        while (now := loop.time()) < stop_at:
            key = draws[next_draw % len(draws)]
            next_draw += 1
            sent = time.perf_counter()
            try:
                answered, data = await ask(client, args.url, key)
            except (aiohttp.ClientError, OSError, ValueError, KeyError):
                answered, data = False, None
            took_us = int((time.perf_counter() - sent) * 1e6)
            counts["answered_total"] += 1  # warm-up included
            if now < measure_from:
                continue
            counts["completed"] += 1
            if not answered:
                counts["errors"] += 1
            elif data != {"key": f"/item/{key}"}:
                counts["mismatches"] += 1
            else:
                counts["ok"] += 1
                hist.record_value(max(1, took_us))

    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.connections)))
    elapsed = loop.time() - measure_from
    return {
        **counts,
        "rps": round(counts["ok"] / elapsed, 1) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 3),
        "latency_ok_us": summarize(hist),
        "distinct_keys_drawn": len(set(draws)),
    }


async def verify(args: argparse.Namespace) -> dict[str, Any]:
    """Every key once through both gateways; their answers compared, and each against the key asked for."""
    mismatches: list[int] = []
    errors = 0
    semaphore = asyncio.Semaphore(16)

    async def one(client: aiohttp.ClientSession, key: int) -> None:
        nonlocal errors
        async with semaphore:
            (a_ok, a), (b_ok, b) = await asyncio.gather(
                ask(client, args.url, key), ask(client, args.verify_against, key)
            )
        if not (a_ok and b_ok):
            errors += 1
        elif a != b or a != {"key": f"/item/{key}"}:
            mismatches.append(key)

    async with aiohttp.ClientSession() as client:
        await asyncio.gather(*(one(client, key) for key in range(1, args.keys + 1)))
    return {"keys": args.keys, "mismatches": len(mismatches), "mismatched_keys": mismatches[:20], "errors": errors}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotkeys_load", description=__doc__)
    p.add_argument("--url", required=True, help="the gateway's base URL")
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--verify-against", help="verification pass: compare every key's answer with this gateway's")
    args = p.parse_args()
    import uvloop

    result = uvloop.run(verify(args) if args.verify_against else load(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

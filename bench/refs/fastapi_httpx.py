"""Typical FastAPI, as most tutorials write it: a pydantic request model, one ``httpx.AsyncClient`` (default
limits) opened in the lifespan, ``asyncio.gather`` over the sources, ``response.json()``, and uvicorn's defaults
(uvloop and httptools when installed, access log on)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Source(BaseModel):
    upstream: str
    path: str


class AggregateRequest(BaseModel):
    sources: dict[str, Source]


def create_app(upstreams: dict[str, str]) -> FastAPI:
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=5.0) as client:
            clients["default"] = client
            yield

    app = FastAPI(lifespan=lifespan)

    async def fetch(source: Source) -> dict[str, Any]:
        response = await clients["default"].get(upstreams[source.upstream] + source.path)
        return {"ok": response.is_success, "status": response.status_code, "data": response.json()}

    @app.post("/aggregate")
    async def aggregate(body: AggregateRequest) -> dict[str, Any]:
        results = await asyncio.gather(*(fetch(source) for source in body.sources.values()))
        return {"results": dict(zip(body.sources, results, strict=True))}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.refs.fastapi_httpx")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstreams", required=True, help="JSON: upstream name -> base URL")
    args = p.parse_args()
    uvicorn.run(create_app(json.loads(args.upstreams)), host="127.0.0.1", port=args.port, backlog=4096)


if __name__ == "__main__":
    main()

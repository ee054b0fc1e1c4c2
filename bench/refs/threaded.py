"""The classic threaded pattern: a sync FastAPI endpoint (run in Starlette's thread pool) that fans out with a
``ThreadPoolExecutor(max_workers=10)`` per request and a blocking ``requests.get`` per source, as the classic
``concurrent.futures`` examples do. Served by uvicorn with its defaults."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Source(BaseModel):
    upstream: str
    path: str


class AggregateRequest(BaseModel):
    sources: dict[str, Source]


def fetch(url: str) -> dict[str, Any]:
    response = requests.get(url, timeout=5)
    return {"ok": response.ok, "status": response.status_code, "data": response.json()}


def create_app(upstreams: dict[str, str]) -> FastAPI:
    app = FastAPI()

    @app.post("/aggregate")
    def aggregate(body: AggregateRequest) -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=10) as pool:
            futures = {
                name: pool.submit(fetch, upstreams[source.upstream] + source.path)
                for name, source in body.sources.items()
            }
            return {"results": {name: future.result() for name, future in futures.items()}}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.refs.threaded")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstreams", required=True, help="JSON: upstream name -> base URL")
    args = p.parse_args()
    uvicorn.run(create_app(json.loads(args.upstreams)), host="127.0.0.1", port=args.port, backlog=4096)


if __name__ == "__main__":
    main()

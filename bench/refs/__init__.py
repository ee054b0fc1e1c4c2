"""Reference implementations of the same fan-out, for comparison only; they are not part of the product.

Each serves ``POST /aggregate`` with the gateway's request body (``{"sources": {name: {"upstream", "path"}}}``)
and answers ``{"results": {name: {"ok", "status", "data"}}}``, and ``GET /healthz``. Upstream names map to base
URLs given on the command line as JSON (``--upstreams '{"u0": "http://127.0.0.1:9001"}'``).
"""

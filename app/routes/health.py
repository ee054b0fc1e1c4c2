"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.responses import JSONResponse
from app.state import get_state

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """Liveness: answers while the process and its event loop respond."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 only when every resource has started and the gateway is not draining."""
    readiness = get_state(request).readiness
    return JSONResponse(readiness.report(), status_code=200 if readiness.ready else 503)

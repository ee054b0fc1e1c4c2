"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.responses import JSONResponse
from app.state import get_state

router = APIRouter(tags=["health"])


class Alive(BaseModel):
    status: Literal["ok"]


class ReadinessReport(BaseModel):
    status: Literal["ready", "starting", "draining", "stopping"]
    not_ready: list[str]


@router.get("/healthz", response_model=None, responses={200: {"model": Alive}})
async def healthz() -> JSONResponse:
    """Liveness: answers while the process and its event loop respond."""
    # Under `gateway serve` the HTTP protocol answers a well-formed probe itself, in the loop turn that read it
    # (app/security/protocol.py), with this same body; this route answers under any other ASGI server, and is the
    # endpoint's OpenAPI operation.
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=None,
    responses={
        200: {"model": ReadinessReport, "description": "Ready"},
        503: {"model": ReadinessReport, "description": "Not ready (starting, draining or stopping)"},
    },
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 only when every resource has started and the gateway is not draining."""
    readiness = get_state(request).readiness
    return JSONResponse(readiness.report(), status_code=200 if readiness.ready else 503)

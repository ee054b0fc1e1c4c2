"""Operator endpoints: what the gateway is doing right now. Served on the admin listener; without one, on the
public listener to keys with the `admin` scope (authentication on); never anonymously on the public listener."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import HTMLResponse, Response

from app.diagnostics.introspect import task_snapshot, thread_snapshot
from app.errors import ResourceClosedError
from app.responses import JSONResponse
from app.state import GatewayState, get_state

router = APIRouter(prefix="/debug", tags=["diagnostics"])

MAX_PROFILE_SECONDS = 60.0


def _diagnostics(state: GatewayState) -> Any:
    if state.diagnostics is None:
        raise ResourceClosedError("diagnostics are not running")
    return state.diagnostics


@router.get("/tasks")
async def tasks(request: Request) -> JSONResponse:
    diag = _diagnostics(get_state(request))
    snapshot = task_snapshot(diag.task_ages)
    return JSONResponse({"count": len(snapshot), "tasks": snapshot})


@router.get("/threads")
async def threads(request: Request) -> JSONResponse:
    diag = _diagnostics(get_state(request))
    snapshot = thread_snapshot(diag.busy_since)
    return JSONResponse({"count": len(snapshot), "threads": snapshot})


@router.get("/pools")
async def pools(request: Request) -> JSONResponse:
    state = get_state(request)
    body: dict[str, Any] = {"admission": None, "db": None, "cpu": None, "upstreams": {}}
    if state.admission is not None:
        body["admission"] = state.admission.snapshot()
    if state.db is not None:
        executor = state.db.executor
        body["db"] = {
            "executor": asdict(executor.stats()),
            "running_threads": len(executor.running_threads()),
            "pool": state.db.pool_stats(),
        }
    if state.cpu is not None:
        body["cpu"] = asdict(state.cpu.stats())
    if state.upstreams is not None:
        for name, up in state.upstreams.upstreams.items():
            body["upstreams"][name] = {
                "in_flight": up.in_flight,
                "limit": up.config.max_concurrency,
                "breaker": up.breaker.state.name.lower(),
                "breaker_retry_after_s": round(up.breaker.retry_after_s(), 3),
                # Several endpoints: each with its state; none (null) for a single base_url.
                "policy": up.config.policy if up.endpoints is not None else None,
                "endpoints": up.endpoints.snapshot() if up.endpoints is not None else None,
                "cache": up.cache.snapshot() if up.cache is not None else None,
            }
    return JSONResponse(body)


@router.get("/profile", response_model=None)
async def profile(
    request: Request,
    seconds: float = Query(5.0, gt=0, le=MAX_PROFILE_SECONDS),
    mode: Literal["cpu", "wall"] = "cpu",
    format: Literal["speedscope", "html"] = "speedscope",
) -> Response:
    """Profile the event-loop thread for ``seconds``; speedscope JSON (open in speedscope.app) or HTML."""
    diag = _diagnostics(get_state(request))
    rendered = await diag.profiler.profile(seconds, mode, format)
    if format == "html":
        return HTMLResponse(rendered)
    return Response(rendered, media_type="application/json")


@router.get("/memory")
async def memory(request: Request, top: int = Query(25, ge=1, le=200)) -> JSONResponse:
    return JSONResponse(_diagnostics(get_state(request)).memory(top))

"""/aggregate: fan one request out to configured upstreams and named queries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.aggregate.models import AggregateRequest, SourceResult
from app.aggregate.service import Aggregator, Plan, effective_deadline_s, merge_flat, plan_composite, plan_request
from app.errors import ClientDisconnectedError, ValidationFailedError
from app.middleware.request_id import request_id_of
from app.observability.http import add_log_fields
from app.responses import JSONResponse
from app.state import GatewayState, get_state

router = APIRouter(tags=["aggregate"])

T = TypeVar("T")


# The body is read and validated here rather than by FastAPI's body parameter: pydantic parses the JSON itself in
# one pass (FastAPI decodes it with the standard library, then validates the Python objects, and parses the
# Content-Type with the email package on every request). Errors take FastAPI's shape, so they map to the same
# 422 problem.
_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": AggregateRequest.model_json_schema()}},
    }
}


def parse_aggregate(raw: bytes, content_type: str | None) -> AggregateRequest:
    """Raises RequestValidationError (422 problem) for a body that is not a valid aggregate request, or that is
    declared as something other than JSON (as FastAPI does: no Content-Type is read as JSON)."""
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if not media.startswith("application/") or not (media == "application/json" or media.endswith("+json")):
            error = {"type": "content_type", "loc": ("body",), "msg": "Content-Type must be application/json"}
            raise RequestValidationError([{**error, "input": content_type}])
    try:
        return AggregateRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@router.post("/aggregate", openapi_extra=_BODY_SCHEMA)
async def aggregate(request: Request) -> JSONResponse:
    """Run the sources named in the body. 200 for a valid request, whatever each source's outcome."""
    body = parse_aggregate(await request.body(), request.headers.get("content-type"))
    state = get_state(request)
    plans = plan_request(state.settings, body)
    deadline_s = effective_deadline_s(state.settings, body.deadline_ms)
    results = await _run(state, request, plans, deadline_s, flat=False)
    complete = all(r["ok"] for r in results.values())
    return _respond({"complete": complete, "results": results}, complete, 200)


@router.get("/aggregate/{composite}")
async def aggregate_composite(composite: str, request: Request) -> JSONResponse:
    """Run a composite declared in the config, its templates filled from the query string. 502 when a source
    marked `required` failed."""
    state = get_state(request)
    query = dict(request.query_params)
    if len(query) != len(request.query_params.multi_items()):
        raise ValidationFailedError("each query parameter may be given once")
    config, plans = plan_composite(state.settings, composite, query)
    deadline_ms = config.deadline_ms if config.deadline_ms is not None else None
    deadline_s = effective_deadline_s(state.settings, deadline_ms)
    results = await _run(state, request, plans, deadline_s, flat=config.merge == "flat")
    complete = all(r["ok"] for r in results.values())
    required_failed = any(not results[name]["ok"] for name, plan in plans.items() if plan.required)
    content: dict[str, object] = {"complete": complete, "results": results}
    if config.merge == "flat":
        content = {
            "complete": complete,
            "data": merge_flat(results),
            "results": {name: {k: v for k, v in r.items() if k != "data"} for name, r in results.items()},
        }
    return _respond(content, complete, 502 if required_failed else 200)


def _respond(content: Mapping[str, object], complete: bool, status: int) -> JSONResponse:
    return JSONResponse(dict(content), status_code=status, headers={"X-Aggregate-Complete": str(complete).lower()})


async def _run(
    state: GatewayState, request: Request, plans: Mapping[str, Plan], deadline_s: float, *, flat: bool
) -> dict[str, SourceResult]:
    aggregator = Aggregator(
        state.require_upstreams(), state.db, state.cpu, tracing=state.tracing, scope=request.scope, split_keys=flat
    )
    headers = {"X-Request-ID": request_id_of(request.scope)}
    results = await until_disconnected(request, aggregator.run(plans, deadline_s, headers=headers))
    add_log_fields(
        request.scope,
        sources={
            name: {
                "outcome": r["error"]["type"] if r["error"] is not None else "ok",
                "attempts": r["attempts"],
                "elapsed_ms": r["elapsed_ms"],
            }
            for name, r in results.items()
        },
    )
    return results


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (its upstream calls close their
    connections, its queries are cancelled on the server) and raise ClientDisconnectedError.

    FastAPI does not cancel a handler whose client disconnected; the body is already read here, so the next
    ASGI receive() returns only when the client disconnects.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watcher, work_task):
            if not task.done():
                task.cancel()
        # Wait for both to finish cancelling, so no task outlives the request.
        await asyncio.gather(watcher, work_task, return_exceptions=True)
    if work_task in done:
        return work_task.result()
    raise ClientDisconnectedError("the client disconnected before the aggregate finished")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

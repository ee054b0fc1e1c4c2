"""/aggregate: fan one request out to configured upstreams and named queries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from app.aggregate import schema
from app.aggregate.execute import Aggregator
from app.aggregate.models import (
    AggregateRequest,
    AggregateResponse,
    FlatAggregateResponse,
    SourceResult,
    UpstreamSourceSpec,
)
from app.aggregate.plan import Plan, effective_deadline_s, plan_composite, plan_request
from app.aggregate.results import merge_flat
from app.errors import ClientDisconnectedError, ValidationFailedError
from app.jsonkeys import duplicate_keys
from app.middleware.request_id import request_id_of
from app.observability.http import SUMMARY_KEY, add_log_fields
from app.responses import JSONResponse
from app.routes.disconnect import until_disconnected
from app.security.policy import authorize_composite, authorize_sources, principal_of
from app.settings import Settings
from app.state import GatewayState, get_state

router = APIRouter(tags=["aggregate"])


class LeanAggregate:
    """POST /aggregate as a plain ASGI endpoint, placed before the routes FastAPI builds (app/main.py).

    The hottest route skips FastAPI's per-request machinery (route matching through the included routers,
    dependency solving, the body read, decoded by the standard library and then validated as Python objects):
    the body is validated by pydantic straight from its bytes, in one pass. It is the only route for the endpoint;
    its OpenAPI operation is made from the same models (``_LeanRoute.openapi``, app/aggregate/schema.py) and its
    errors go through the same exception handlers as every route's (app/problems.py).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ClientDisconnectedError("the client disconnected while sending the body") from None
        body = parse_body(request.headers.get("content-type"), raw)
        response = await _aggregate(request, body)
        await response(scope, receive, send)


async def serve_hot(scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """POST /aggregate as the front layer serves it (app/middleware/front.py): with the whole body, already
    bounded in size and depth. Raises what _aggregate raises; the front answers it."""
    request = Request(scope, receive)
    parsed = parse_body(request.headers.get("content-type"), body)
    response = await _aggregate(request, parsed)
    await response(scope, receive, send)


class _LeanRoute(Route):
    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self  # as FastAPI's routes do: metrics, logs and spans are labelled by it
        return match, child_scope

    def openapi(self, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
        """This route's operations by method, and the component schemas they refer to (app/openapi.py)."""
        components = {**schema.request_components(settings), **schema.response_components()}
        operation = {
            "tags": ["aggregate"],
            "summary": "Aggregate",
            "description": "Run the sources named in the body. 200 for a valid request, whatever their outcomes.",
            "operationId": "aggregate",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": schema.REF.format(model="AggregateRequest")}}},
            },
            "responses": {
                "200": {
                    "description": "One result per source, whatever its outcome",
                    "content": {"application/json": {"schema": {"$ref": schema.REF.format(model="AggregateResponse")}}},
                },
                "422": {"description": "Request validation failed"},
            },
        }
        return {"post": operation}, components


def lean_route() -> Route:
    """POST /aggregate served by LeanAggregate; to be placed before the routers FastAPI builds."""
    return _LeanRoute("/aggregate", LeanAggregate(), methods=["POST"], include_in_schema=False)


def parse_body(content_type: str | None, raw: bytes) -> AggregateRequest:
    """Raises RequestValidationError, located under ``body`` as FastAPI's own."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        message = "the body must be JSON, sent with Content-Type: application/json"
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "msg": message}])
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark, which RFC 8259 lets a parser ignore
    try:
        body = AggregateRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
    # The parser kept the last of duplicate keys. Every key is followed by a colon, so when the body holds no more
    # colons than the parsed request has keys, no key came twice (about 1 µs on a typical body); only a body with
    # colons inside strings, or a duplicate, pays for the exact check (app/jsonkeys.py, about 5 µs).
    if raw.count(b":") != _keys(body):
        duplicates = duplicate_keys(raw)
        if duplicates:
            raise RequestValidationError(
                [
                    {"type": "duplicate_key", "loc": ("body", *loc), "msg": f"the key {loc[-1]!r} is given twice"}
                    for loc in duplicates
                ]
            )
    return body


def _keys(body: AggregateRequest) -> int:
    """How many keys the body's JSON held, were none given twice: one per field given (extra fields are refused),
    one per entry of each mapping, and those of the upstream body (``json``). A duplicate adds a key (and its colon)
    that the parsed request no longer shows."""
    count = len(body.model_fields_set) + len(body.sources)
    for spec in body.sources.values():
        count += len(spec.model_fields_set) + len(spec.params)
        if isinstance(spec, UpstreamSourceSpec):
            count += len(spec.headers)
            if spec.body is not None:
                count += _json_keys(spec.body)
    return count


def _json_keys(value: Any) -> int:
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


async def _aggregate(request: Request, body: AggregateRequest) -> JSONResponse:
    state = get_state(request)
    authorize_sources(principal_of(request.scope), body)
    plans = plan_request(state.settings, body)
    deadline_s = effective_deadline_s(state.settings, body.deadline_ms)
    results = await _run(state, request, plans, deadline_s, flat=False)
    complete = all(r["ok"] for r in results.values())
    return _respond({"complete": complete, "results": results}, complete, 200)


_COMPOSITE_ANSWER = {"model": AggregateResponse | FlatAggregateResponse}


@router.get(
    "/aggregate/{composite}",
    response_model=None,
    responses={
        200: {**_COMPOSITE_ANSWER, "description": "One result per source (grouped), or merged data (flat)"},
        502: {**_COMPOSITE_ANSWER, "description": "A source marked required failed; the same body as 200"},
        404: {"description": "No such composite"},
    },
)
async def aggregate_composite(
    composite: Annotated[str, Path(description="A composite declared in the config", examples=["user_overview"])],
    request: Request,
) -> JSONResponse:
    """Run a composite declared in the config, its templates filled from the query string. 502 when a source
    marked `required` failed."""
    state = get_state(request)
    authorize_composite(principal_of(request.scope), composite)
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
    limits = state.settings.limits
    aggregator = Aggregator(
        state.require_upstreams(),
        state.db,
        state.cpu,
        tracing=state.tracing,
        scope=request.scope,
        split_keys=flat,
        observer=state.metrics,
        max_calls=limits.max_sources,
        max_reference_bytes=limits.max_reference_bytes,
    )
    headers = {"X-Request-ID": request_id_of(request.scope)}
    work = aggregator.run(plans, deadline_s, headers=headers)
    results = await until_disconnected(request.scope, request.receive, work, what="the aggregate finished")
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
    for name, waited in aggregator.waits.items():  # only sources that referred to others
        summary = request.scope["state"][SUMMARY_KEY]["sources"][name]
        summary["waited_ms"] = round(waited * 1000, 1)
        summary["after"] = results[name]["waited_for"]
    return results

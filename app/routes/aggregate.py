"""POST /aggregate: fan one request out to configured upstreams and named queries."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.aggregate.models import AggregateRequest
from app.aggregate.service import Aggregator, effective_deadline_s, plan_request
from app.responses import JSONResponse
from app.state import get_state

router = APIRouter(tags=["aggregate"])


@router.post("/aggregate")
async def aggregate(body: AggregateRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    plans = plan_request(state.settings, body)
    aggregator = Aggregator(state.settings, state.require_http(), state.db)
    results = await aggregator.run(plans, effective_deadline_s(state.settings, body.deadline_ms))
    complete = all(r["ok"] for r in results.values())
    return JSONResponse(
        {"complete": complete, "results": results},
        headers={"X-Aggregate-Complete": "true" if complete else "false"},
    )

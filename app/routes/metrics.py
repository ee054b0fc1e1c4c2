"""Prometheus exposition, in OpenMetrics when the scraper asks for it."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from app.state import get_state

router = APIRouter(tags=["observability"])


_EXPOSITION = {"schema": {"type": "string"}}


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text, or OpenMetrics when asked for",
            "content": {"text/plain": _EXPOSITION, "application/openmetrics-text": _EXPOSITION},
        }
    },
)
async def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(get_state(request).require_metrics().registry), media_type=content_type)

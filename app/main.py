"""The app factory. Building the app opens nothing: the lifespan does, when the server starts it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from app import __version__, problems
from app.lifecycle.lifespan import build_lifespan
from app.middleware.body_limit import BodyLimitMiddleware
from app.middleware.request_id import RequestIdMiddleware
from app.observability.http import HttpMetricsMiddleware
from app.responses import JSONResponse
from app.routes import aggregate, health, metrics, transform
from app.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


def create_app(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """Build the app; the lifespan opens its resources. ``tracer_provider``: bring your own OpenTelemetry
    provider (spans are then recorded whatever ``observability.tracing.enabled`` says)."""
    app = FastAPI(
        title="gateway",
        version=__version__,
        lifespan=build_lifespan(settings),
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    app.state.tracer_provider = tracer_provider
    problems.install(app)
    # Added last = outermost: the request id is set before anything else runs, so even a 413 carries one.
    # Transforms take arrays, far larger than any aggregate request: they have their own cap.
    app.add_middleware(
        BodyLimitMiddleware,
        default=settings.limits.max_body_bytes,
        limits={"/transform": settings.compute.max_body_bytes},
    )
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    for module in (health, aggregate, transform):
        app.include_router(module.router)
    if settings.observability.admin_port is None:
        app.include_router(metrics.router)
    return app

"""The app factory. Building the app opens nothing: the lifespan does, when the server starts it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from app import __version__, problems
from app.errors import ConfigError
from app.lifecycle.lifespan import build_lifespan
from app.middleware.auth import AuthMiddleware
from app.middleware.body_limit import BodyLimitMiddleware
from app.middleware.json_depth import JsonDepthMiddleware
from app.middleware.request_id import RequestIdMiddleware
from app.middleware.request_limits import RequestLimitsMiddleware
from app.middleware.security_headers import SecurityHeadersMiddleware
from app.observability.http import HttpMetricsMiddleware
from app.openapi import install_openapi
from app.responses import JSONResponse
from app.routes import aggregate, debug, docs, health, metrics, transform
from app.security.access import SCHEMA_PATH, AccessRules
from app.security.admission import Admission
from app.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

# Never shed: an overloaded gateway must still say it is alive, whether it is ready, and how saturated it is.
UNSHED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_app(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """Build the app; the lifespan opens its resources. ``tracer_provider``: bring your own OpenTelemetry
    provider (spans are then recorded whatever ``observability.tracing.enabled`` says).

    Raises ConfigError when a route has no access rule (app/security/access.py)."""
    app = FastAPI(
        title="gateway",
        version=__version__,
        lifespan=build_lifespan(settings),
        default_response_class=JSONResponse,
        # FastAPI's own docs pages load their scripts from a CDN: app/routes/docs.py serves them from the gateway.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.tracer_provider = tracer_provider
    # Decided in the HTTP protocol, before the app (app/security/protocol.py); kept here, with the app it guards.
    app.state.admission = Admission(
        limit=settings.limits.max_in_flight_requests,
        retry_after_s=settings.limits.shed_retry_after_s,
        exempt=UNSHED_PATHS,
        floor=settings.limits.min_in_flight_requests,
        target_lag_s=settings.limits.shed_loop_lag_ms / 1000,
    )
    problems.install(app)
    # First in line, ahead of the routes FastAPI builds: the lean endpoint of the hottest route.
    app.router.routes.append(aggregate.lean_route())
    for module in (health, aggregate, transform):
        app.include_router(module.router)
    if settings.observability.admin_port is None:
        app.include_router(metrics.router)
    if settings.auth.enabled and settings.observability.admin_port is None:
        # Without an admin listener, operators reach /debug here, with an `admin` key; never anonymously. Kept out
        # of the public API's schema: it describes the API clients call, not the operators' tools.
        app.include_router(debug.router, include_in_schema=False)
    if settings.server.docs:
        app.include_router(docs.build_router(title=app.title, openapi_url=SCHEMA_PATH))
    rules = AccessRules()
    unruled = rules.unruled(_paths(app.routes))
    if unruled:
        raise ConfigError([f"route {path} has no access rule in app/security/access.py" for path in unruled])
    install_openapi(app, rules, auth=settings.auth.enabled)
    _add_middleware(app, settings, rules)
    return app


def _add_middleware(app: FastAPI, settings: Settings, rules: AccessRules) -> None:
    limits = settings.limits
    # Added innermost first (Starlette wraps each new one around the previous). Before all of them, in the HTTP
    # protocol: the head's size and time bounds, and the global in-flight limit. From the outside in:
    #   request id       every answer carries one, even a shed 503
    #   metrics          counts every answer, shed and refused ones too
    #   security headers on every answer
    #   CORS             only when origins are configured; outside the refusals, so a browser can read them
    #   request limits   header count and size, URL, query parameters: the head only, nothing read yet
    #   auth             401 / 403 / 429 before any body is read
    #   body limit       413 while the body streams in
    #   JSON depth       400 before any parser recurses
    # /transform streams and checks its own (much larger) bodies, shape and rank included, without buffering them.
    app.add_middleware(JsonDepthMiddleware, max_depth=limits.max_json_depth, exempt=("/transform",))
    app.add_middleware(
        BodyLimitMiddleware, default=limits.max_body_bytes, limits={"/transform": settings.compute.max_body_bytes}
    )
    if settings.auth.enabled:
        app.add_middleware(AuthMiddleware, rules=rules)
    app.add_middleware(RequestLimitsMiddleware, limits=limits)
    cors = settings.cors
    if cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_credentials=cors.allow_credentials,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Aggregate-Complete", "Retry-After"],
            max_age=cors.max_age_s,
        )
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)


def _paths(routes: list[BaseRoute]) -> list[str]:
    return [path for route in routes if isinstance(path := getattr(route, "path", None), str)]

"""The composition root: the one place that builds the app and the objects around it, and hands each collaborator
what it needs (the state, the admission count, the in-flight registry). Building opens nothing: the lifespan does,
when the server starts it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.routing import BaseRoute

from app import __version__, problems
from app.errors import ConfigError
from app.lifecycle.inflight import InFlight
from app.lifecycle.lifespan import build_lifespan, expected_resources
from app.lifecycle.readiness import Readiness
from app.middleware.front import Front
from app.openapi import install_openapi
from app.responses import JSONResponse
from app.routes import aggregate, debug, docs, health, metrics, transform
from app.security.access import SCHEMA_PATH, AccessRules
from app.security.admission import Admission
from app.settings import Settings
from app.state import GatewayState

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

# Never shed: an overloaded gateway must still say it is alive, whether it is ready, and how saturated it is.
UNSHED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(frozen=True, eq=False)
class Gateway:
    """What the server runs (``asgi``: the front layer around the app), the FastAPI app itself, and the state the
    three share."""

    asgi: Front
    app: FastAPI
    state: GatewayState


def create_app(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The ASGI app alone (see build_gateway)."""
    return build_gateway(settings, tracer_provider=tracer_provider).app


def build_gateway(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> Gateway:
    """Build the app; the lifespan opens its resources. ``tracer_provider``: bring your own OpenTelemetry
    provider (spans are then recorded whatever ``observability.tracing.enabled`` says).

    Raises ConfigError when a route has no access rule (app/security/access.py)."""
    in_flight = InFlight()
    limits = settings.limits
    # Decided in the HTTP protocol, before the app (app/security/protocol.py); built here, with the app it guards.
    admission = Admission(
        limit=limits.max_in_flight_requests,
        retry_after_s=limits.shed_retry_after_s,
        exempt=UNSHED_PATHS,
        floor=limits.min_in_flight_requests,
        target_lag_s=limits.shed_loop_lag_ms / 1000,
        closing=in_flight.closing,
    )
    state = GatewayState(
        settings=settings,
        readiness=Readiness(expected=expected_resources(settings)),
        admission=admission,
        in_flight=in_flight,
        tracer_provider=tracer_provider,
    )
    app = FastAPI(
        title="gateway",
        version=__version__,
        lifespan=build_lifespan(state),
        default_response_class=JSONResponse,
        # FastAPI's own docs pages load their scripts from a CDN: app/routes/docs.py serves them from the gateway.
        docs_url=None,
        redoc_url=None,
    )
    # The routes' one way to the state (app/state.py:get_state); the middleware is handed it directly.
    app.state.gateway = state
    problems.install(app)
    # First in line, ahead of the routes FastAPI builds: the lean endpoint of the hottest route.
    hot_route = aggregate.lean_route()
    app.router.routes.append(hot_route)
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
    install_openapi(app, rules, settings)
    # Around the app, not inside it: one layer holds every cross-cutting rule (app/middleware/front.py has them in
    # order), and serves POST /aggregate without the framework's per-request layers. Before it, in the HTTP
    # protocol, the head's size and time bounds and the global in-flight limit. /transform streams and checks its
    # own (much larger) bodies, shape and rank included, without buffering them.
    front = Front(
        app,
        state=state,
        rules=rules,
        hot=aggregate.serve_hot,
        hot_route=hot_route,
        body_limits={"/transform": settings.compute.max_body_bytes},
        exempt_from_depth=("/transform",),
    )
    return Gateway(asgi=front, app=app, state=state)


def _paths(routes: list[BaseRoute]) -> list[str]:
    return [path for route in routes if isinstance(path := getattr(route, "path", None), str)]

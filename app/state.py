"""The one typed object that holds every long-lived resource of a running gateway."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from app.compute.pool import CpuPool
from app.db.pool import Database
from app.diagnostics.runtime import Diagnostics
from app.errors import ResourceClosedError
from app.lifecycle.inflight import InFlight
from app.lifecycle.readiness import Readiness
from app.observability.metrics import Metrics
from app.observability.tracing import Tracing
from app.security.admission import Admission
from app.security.guard import Guard
from app.settings import Settings
from app.upstream.client import UpstreamClient
from app.upstream.session import HttpSession

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


@dataclass(eq=False)
class GatewayState:
    """Built with the app (app/main.py), which hands it to each collaborator; the lifespan opens the resources
    (the fields that default to None) and closes them. Nothing else sets a field."""

    settings: Settings
    readiness: Readiness
    admission: Admission
    in_flight: InFlight
    tracer_provider: TracerProvider | None = None
    metrics: Metrics | None = None
    http: HttpSession | None = None
    upstreams: UpstreamClient | None = None
    db: Database | None = None
    cpu: CpuPool | None = None
    loop: asyncio.AbstractEventLoop | None = None
    admin_port: int | None = None
    tracing: Tracing | None = None
    diagnostics: Diagnostics | None = None
    guard: Guard | None = None

    def require_db(self) -> Database:
        if self.db is None:
            raise ResourceClosedError("no database is configured")
        return self.db

    def require_cpu(self) -> CpuPool:
        if self.cpu is None:
            raise ResourceClosedError("the CPU pool is not running")
        return self.cpu

    def require_upstreams(self) -> UpstreamClient:
        if self.upstreams is None:
            raise ResourceClosedError("the upstream client is not running")
        return self.upstreams

    def require_metrics(self) -> Metrics:
        if self.metrics is None:
            raise ResourceClosedError("the gateway has not started")
        return self.metrics


def get_state(request: Request) -> GatewayState:
    """The running gateway's state, for a route (set on the app once, when app/main.py builds it)."""
    state: GatewayState = request.app.state.gateway
    return state

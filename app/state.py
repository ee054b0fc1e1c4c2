"""The one typed object that holds every long-lived resource of a running gateway."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from app.compute.pool import CpuPool
from app.db.pool import Database
from app.errors import ResourceClosedError

if TYPE_CHECKING:
    from app.diagnostics.runtime import Diagnostics
from app.lifecycle.readiness import Readiness
from app.observability.metrics import Metrics
from app.observability.tracing import Tracing
from app.security.admission import Admission
from app.security.guard import Guard
from app.settings import Settings
from app.upstream.client import UpstreamClient
from app.upstream.session import HttpSession


@dataclass
class GatewayState:
    settings: Settings
    readiness: Readiness
    metrics: Metrics
    http: HttpSession | None = None
    upstreams: UpstreamClient | None = None
    db: Database | None = None
    cpu: CpuPool | None = None
    loop: asyncio.AbstractEventLoop | None = None
    admin_port: int | None = None
    tracing: Tracing | None = None
    diagnostics: Diagnostics | None = None
    guard: Guard | None = None
    admission: Admission | None = None

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

    def require_http(self) -> HttpSession:
        if self.http is None:
            raise ResourceClosedError("the HTTP session is not open")
        return self.http


def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state

"""Authentication, scopes and rate limits, before any body is read: an unauthenticated client costs the gateway a
hash and a header, never a parse. Which scope a path needs is in app/security/access.py."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ProblemError, ResourceClosedError
from app.problems import problem, response_for
from app.security.access import OPEN, AccessRules
from app.security.policy import PRINCIPAL_KEY


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, rules: AccessRules) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = self.rules.scope_for(scope["path"])
        if needed == OPEN:
            await self.app(scope, receive, send)
            return
        gateway = getattr(scope["app"].state, "gateway", None)
        guard = gateway.guard if gateway is not None else None
        if guard is None:
            err = ResourceClosedError("the gateway is not ready")
            await problem(503, "unavailable", "Unavailable", str(err), headers={"Retry-After": "1"})(
                scope, receive, send
            )
            return
        try:
            principal = await guard.authenticate(scope["headers"])
            if needed is not None:
                guard.authorize(principal, needed)
            await guard.admit(principal)
        except ProblemError as err:
            await response_for(err)(scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)

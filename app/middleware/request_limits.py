"""Limits on the request head, checked before anything else reads it: header count and size, URL length, number
of query parameters. Each is answered with its own problem type, and the connection is closed after it.

The HTTP protocol (app/security/protocol.py) already bounded the head's total size and time while it arrived;
these are the finer limits, on the parsed head.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.problems import response_for
from app.security.headers import head_problem
from app.settings import LimitSettings


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, *, limits: LimitSettings) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            err = head_problem(scope, self.limits)
            if err is not None:
                await response_for(err, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)

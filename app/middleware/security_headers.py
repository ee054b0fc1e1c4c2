"""Response headers for a JSON API that no browser should render, frame, cache or sniff."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.security.headers import SECURITY_HEADERS as HEADERS


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                # A route that chose its own (a cacheable answer, say) keeps it.
                headers.extend(h for h in HEADERS if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)

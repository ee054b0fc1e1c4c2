"""JSON nesting depth, checked on the raw body before any parser recurses into it (400 ``json-too-deep``).

Only bodies the app would parse as JSON are read here (no content type, ``application/json``, ``+json``); others
stream through untouched. The body is already capped by BodyLimitMiddleware, which must sit outside this one:
reading past the cap raises there and is answered 413.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import JsonTooDeepError
from app.problems import response_for
from app.security.jsondepth import exceeds_depth

_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_json(scope: Scope) -> bool:
    ctype: bytes | None = next((v for k, v in scope["headers"] if k == b"content-type"), None)
    if ctype is None:
        return True  # checked too: cheap, and whatever later parses it meets a body of bounded depth
    media = ctype.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class JsonDepthMiddleware:
    def __init__(self, app: ASGIApp, *, max_depth: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_depth = max_depth
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _WITH_BODY
            or scope["path"].startswith(self.exempt)
            or not _is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away mid-body: let the app see exactly that.
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if exceeds_depth(body, self.max_depth):
            err = JsonTooDeepError(f"the JSON body nests deeper than {self.max_depth} levels")
            await response_for(err)(scope, receive, send)
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replaying_receive() -> Message:
        # After the body, receive() is how a handler learns of a disconnect: hand it to the real one.
        return pending.pop(0) if pending else await receive()

    return replaying_receive

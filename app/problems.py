"""The one place that maps errors to RFC 9457 problem responses. No stack trace ever reaches a client.

``problem_body`` is the one builder of a problem's JSON: the app's responses use it, and so do the answers the
HTTP protocol writes straight to the socket (app/security/protocol.py, app/security/admission.py)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import NotReadyError, ProblemError, ResourceClosedError
from app.responses import ProblemResponse, dumps

log = logging.getLogger(__name__)

TYPE_PREFIX = "urn:gateway:problem:"


def problem_body(
    status: int, type_: str, title: str, detail: str, *, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": TYPE_PREFIX + type_, "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return body


def problem_json(err: ProblemError) -> bytes:
    """The encoded body of ``err``'s problem, for answers written without a response object."""
    return dumps(problem_body(err.status, err.type, err.title, err.detail, errors=err.errors))


def problem(
    status: int,
    type_: str,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> ProblemResponse:
    return ProblemResponse(
        problem_body(status, type_, title, detail, errors=errors), status_code=status, headers=headers
    )


def response_for(err: ProblemError, *, close: bool = False) -> ProblemResponse:
    """The problem response for one of the gateway's own errors; ``close`` ends the connection after it (for a
    client whose unread body or oversized head the server should not try to resynchronise with)."""
    headers = err.headers()
    if close:
        headers = {**headers, "Connection": "close"}
    return problem(err.status, err.type, err.title, err.detail, errors=err.errors, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        out.append({"loc": ".".join(loc), "msg": str(err.get("msg", "invalid")), "type": str(err.get("type", ""))})
    return out


async def _problem_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ProblemError)
    return response_for(exc)


async def _request_validation(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc)
    return problem(
        422, "validation", "Request validation failed", f"{len(errors)} problem(s) in the request", errors=errors
    )


async def _http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug = {400: "bad-request", 404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(
        exc.status_code, "http"
    )
    return problem(exc.status_code, slug, str(exc.detail), str(exc.detail), headers=dict(exc.headers or {}))


async def _closed(request: Request, exc: Exception) -> ProblemResponse:
    return response_for(NotReadyError(str(exc)))


async def _unhandled(request: Request, exc: Exception) -> ProblemResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal", "Internal error", "the gateway failed to answer; the error was logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ResourceClosedError, _closed)
    app.add_exception_handler(Exception, _unhandled)

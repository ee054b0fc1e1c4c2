"""The OpenAPI document, made to describe what the gateway really answers: every error is an RFC 9457 problem
(``application/problem+json``), the refusals that middleware can give anywhere are declared on every operation,
the security requirements follow the same access table the auth middleware enforces, and requests are described
for the configuration served (its upstream, query and composite names, their typed parameters: see
app/aggregate/schema.py), so that a request valid by the document is one the gateway takes, and the reverse.

Built once, at the first request for it, and cached."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from app.aggregate.schema import composite_paths
from app.routes.transform_schema import transform_paths
from app.security.access import OPEN, AccessRules
from app.settings import Settings

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemItem(BaseModel):
    loc: str = Field(description="Where: a dotted path such as sources.stock.path.")
    msg: str
    type: str = Field(description="A machine-readable reason, e.g. unsafe_path or not_allowed.")


class Problem(BaseModel):
    """RFC 9457 problem details. ``type`` is stable: ``urn:gateway:problem:<slug>``."""

    type: str = Field(pattern=r"^urn:gateway:problem:[a-z0-9\-]+$")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[ProblemItem] | None = Field(None, description="One entry per problem, for validation failures.")


# What any operation may answer, whatever its route does: the request head, the body, the admission limit.
_ANYWHERE = {
    "400": "Malformed request, too many query parameters, or JSON nested too deeply",
    "413": "Request body too large",
    "414": "Path and query string too long",
    "431": "Too many or too large header fields",
    "500": "Internal error (logged; never a stack trace)",
    "503": "Overloaded or not ready: retry after Retry-After seconds",
}
_PROTECTED = {
    "401": "No valid API key or bearer token (WWW-Authenticate says which, RFC 6750)",
    "403": "The key or token lacks the scope, or names a source outside its allowlist",
    "429": "The key's rate limit is exhausted: retry after Retry-After seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}, "required": True}}
_SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key or JWT>"},
    "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
_FASTAPI_DEFAULTS = ("HTTPValidationError", "ValidationError")
# Routes FastAPI documents once for every composite, every transform: the document lists each one served instead.
_EXPANDED = {("/aggregate/{composite}", "get"): composite_paths, ("/transform/{name}", "post"): transform_paths}


@runtime_checkable
class DocumentedRoute(Protocol):
    """A route FastAPI does not document (a plain Starlette route, such as the lean POST /aggregate) that
    describes itself: its operations by method, and the component schemas they refer to."""

    path: str

    def openapi(self, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]: ...


def _problem_ref() -> dict[str, Any]:
    return {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _is_fastapi_default(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return str(schema.get("$ref", "")).endswith("/HTTPValidationError")


def _tighten(node: Any) -> None:
    """Make pydantic's schemas say what the models enforce: a dict whose keys must match a pattern accepts no other
    key (JSON Schema would let other keys through unconstrained)."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node and "properties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _tighten(value)
    elif isinstance(node, list):
        for value in node:
            _tighten(value)


def _json_schema(response: dict[str, Any]) -> None:
    # The gateway's JSONResponse is not FastAPI's, so FastAPI types its body as a string: it is JSON, described by
    # the declared model when there is one.
    content = response.get("content", {}).get("application/json")
    if content is None:
        return
    schema = content.get("schema", {})
    if "$ref" in schema or "anyOf" in schema:
        schema.pop("type", None)
    elif schema == {"type": "string"}:
        content["schema"] = {}


def build_openapi(app: FastAPI, rules: AccessRules, settings: Settings) -> dict[str, Any]:
    auth = settings.auth.enabled
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    paths: dict[str, Any] = doc.setdefault("paths", {})
    for route in app.routes:
        if isinstance(route, DocumentedRoute):
            operations, components = route.openapi(settings)
            paths.setdefault(route.path, {}).update(operations)
            schemas.update(components)
    for (path, method), expand in _EXPANDED.items():
        template = paths.pop(path, None)
        if template is not None:
            paths.update(expand(settings, template[method]))
    _tighten(schemas)
    for name in _FASTAPI_DEFAULTS:
        schemas.pop(name, None)
    schemas.update(Problem.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs", {}))
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas["Problem"].pop("$defs", None)
    if auth:
        doc["components"]["securitySchemes"] = _SECURITY_SCHEMES
    for path, item in doc.get("paths", {}).items():
        protected = auth and rules.scope_for(path) != OPEN
        for operation in item.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            declared = {**_ANYWHERE, **(_PROTECTED if protected else {})}
            for status, description in declared.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                _json_schema(response)
                if not status.isdigit() or int(status) < 400:
                    continue
                # A route's own error body (the readiness report on 503) stays; everything else is a problem.
                if "content" not in response or _is_fastapi_default(response):
                    response["content"] = _problem_ref()
                    if status == "422":
                        response["description"] = "Request validation failed: each problem named in errors"
                if status in ("429", "503") and PROBLEM_MEDIA_TYPE in response["content"]:
                    response.setdefault("headers", {}).update(_RETRY_AFTER)
            if protected:
                operation["security"] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
    return doc


def install_openapi(app: FastAPI, rules: AccessRules, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, rules, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

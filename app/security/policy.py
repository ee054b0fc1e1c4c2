"""Allowlists: a key may name only the upstreams, queries and composites it was given.

Checked against the names in the request, before planning, so a key learns nothing about names it may not use
(a forbidden name is 403 whether or not it exists). A composite is one grant: its own sources are the operator's
choice, so a key allowed a composite needs no upstream or query grants for it.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from app.aggregate.models import AggregateRequest, UpstreamSourceSpec
from app.errors import ForbiddenError
from app.security.keys import UNRESTRICTED, Principal

PRINCIPAL_KEY = "principal"


def principal_of(scope: Scope) -> Principal:
    """The caller that the auth middleware admitted; unrestricted when authentication is off."""
    principal = scope.get("state", {}).get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else UNRESTRICTED


def authorize_sources(principal: Principal, request: AggregateRequest) -> None:
    """Raises ForbiddenError naming every source outside the key's allowlists."""
    errors: list[dict[str, Any]] = []
    for name, spec in request.sources.items():
        if isinstance(spec, UpstreamSourceSpec):
            kind, target, allowed = "upstream", spec.upstream, principal.upstreams
        else:
            kind, target, allowed = "query", spec.query, principal.queries
        if allowed is not None and target not in allowed:
            errors.append(
                {
                    "loc": f"sources.{name}.{kind}",
                    "msg": f"this key may not use {kind} '{target}'",
                    "type": "not_allowed",
                }
            )
    if errors:
        refused = ", ".join(e["loc"].split(".")[1] for e in errors)
        raise ForbiddenError(f"sources outside this key's allowlist: {refused}", errors=errors)


def authorize_composite(principal: Principal, name: str) -> None:
    """Raises ForbiddenError when the key may not run composite ``name``."""
    if principal.composites is not None and name not in principal.composites:
        raise ForbiddenError(f"this key may not run composite '{name}'")

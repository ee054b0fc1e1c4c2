"""Request and result shapes of /aggregate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

# pydantic reads these for the OpenAPI document, and on Python 3.11 only typing_extensions' TypedDict carries what
# it needs.
from typing_extensions import TypedDict

from app.headers import HEADER_NAME_PATTERN, HEADER_VALUE_PATTERN

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")]
Scalar = Annotated[str, Field(max_length=4096)] | int | float | bool
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
HeaderName = Annotated[str, Field(max_length=256, pattern=HEADER_NAME_PATTERN)]
HeaderValue = Annotated[str, Field(max_length=8192, pattern=HEADER_VALUE_PATTERN)]
# One call per element of the list a reference with [*] names (app/aggregate/refs.py), at most max_items of them.
ForEach = Annotated[str, Field(min_length=4, max_length=1024)]
MaxItems = Annotated[int, Field(ge=1, le=1000)]


# Strict: JSON gives each value its type, and the gateway takes it as given (no "5" for 5), so that what the
# document says (app/openapi.py) and what is accepted are the same thing. Strict JSON still takes 5 for a float.
class UpstreamSourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    upstream: Name
    path: str = Field(min_length=1, max_length=2048)
    method: Method = "GET"
    params: dict[Annotated[str, Field(max_length=256)], Scalar] = Field(default_factory=dict, max_length=64)
    body: Any = Field(None, alias="json")
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict, max_length=32)
    for_each: ForEach | None = None
    max_items: MaxItems | None = None

    @field_validator("headers")
    @classmethod
    def _one_spelling_each(cls, value: dict[str, str]) -> dict[str, str]:
        # Names are case-insensitive: one given twice in different cases would reach the upstream as either.
        seen: set[str] = set()
        for name in value:
            if name.lower() in seen:
                raise ValueError(f"header {name.lower()} is given twice")
            seen.add(name.lower())
        return value


class QuerySourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    query: Name
    params: dict[Annotated[str, Field(max_length=256)], Scalar | None] = Field(default_factory=dict, max_length=64)
    for_each: ForEach | None = None
    max_items: MaxItems | None = None


def _source_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "upstream" in value:
            return "upstream"
        if "query" in value:
            return "query"
        return None
    if isinstance(value, UpstreamSourceSpec):
        return "upstream"
    if isinstance(value, QuerySourceSpec):
        return "query"
    return None


SourceSpec = Annotated[
    Annotated[UpstreamSourceSpec, Tag("upstream")] | Annotated[QuerySourceSpec, Tag("query")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="a source names either 'upstream' (with 'path') or 'query'",
    ),
]


class AggregateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "sources": {
                        "profile": {"upstream": "users", "path": "/users/7"},
                        "stock": {"upstream": "inventory", "path": "/stock", "params": {"sku": "A1"}},
                        "orders": {"query": "recent_orders", "params": {"user_id": 7, "limit": 3}},
                    },
                    "deadline_ms": 800,
                }
            ]
        },
    )

    sources: dict[Name, SourceSpec] = Field(min_length=1)
    deadline_ms: float | None = Field(None, gt=0, le=3_600_000)


# The closed set of a failed source's error types (README, "POST /aggregate"; app/errors.py's SourceError leaves).
ErrorType = Literal[
    "timeout",
    "deadline",
    "connect",
    "upstream_status",
    "circuit_open",
    "overloaded",
    "too_large",
    "bad_response",
    "db_error",
    "db_unavailable",
    "dependency_failed",
    "too_many_items",
]


class SourceErrorBody(TypedDict):
    type: Annotated[
        ErrorType,
        Field(
            description="Why the source failed. dependency_failed: not called, because a source it refers to failed"
            " or was skipped, or the value referred to is missing, not a scalar, or unusable where it goes;"
            " too_many_items: its for_each list is longer than max_items or than limits.max_sources allows."
        ),
    ]
    message: str


CacheOutcome = Literal["hit", "miss", "coalesced", "stale"]


class SourceResult(TypedDict):
    ok: bool
    status: int | None
    data: Any
    error: SourceErrorBody | None
    elapsed_ms: float
    attempts: int
    # How the upstream's cache took part (null: it has no cache or single flight, or the source is a query):
    # "hit" a fresh stored answer, "miss" this source called the upstream, "coalesced" it shared another
    # caller's call, "stale" an expired answer served because the upstream failed.
    cache: CacheOutcome | None
    started_ms: Annotated[float, Field(description="When it started, in ms after the request did.")]
    waited_for: Annotated[list[str], Field(description="The sources it referred to, which it waited for.")]


class AggregateResponse(BaseModel):
    """The answer to POST /aggregate and to a grouped composite."""

    complete: bool = Field(description="Every source succeeded.")
    results: dict[str, SourceResult]


class FlatAggregateResponse(BaseModel):
    """The answer to a composite with merge = "flat": merged data, per-source outcomes without their data."""

    complete: bool
    data: dict[str, Any]
    results: dict[str, dict[str, Any]]

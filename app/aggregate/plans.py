"""What a planned source is: resolved against the config, ready to be sent. A source that refers to others is
planned twice: its template when the request is (app/aggregate/chain.py), its plan once its parents answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import ValidationFailedError
from app.settings import QueryConfig
from app.upstream.client import Outbound


@dataclass(frozen=True)
class UpstreamPlan:
    upstream: str
    out: Outbound
    fields: tuple[str, ...] | None = None
    required: bool = False


@dataclass(frozen=True)
class QueryPlan:
    query: str
    config: QueryConfig
    params: dict[str, Any]
    fields: tuple[str, ...] | None = None
    required: bool = False


def text(value: Any) -> str:
    """A scalar as it goes into text (a path, a query string, a header): JSON's spelling of booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Problems:
    """A request's problems, gathered to be raised at once (ValidationFailedError), located."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, loc: str, msg: str, type_: str) -> None:
        self.errors.append({"loc": loc, "msg": msg, "type": type_})

    def raise_if_any(self, what: str) -> None:
        if self.errors:
            raise ValidationFailedError(f"{len(self.errors)} problem(s) in the {what}", errors=self.errors)

"""Named queries: clients pass values, never SQL. Values are typed here, then bound by the driver."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from app.settings import ParamType, QueryConfig

_MAX_INT = 2**63 - 1
_EXPECTED = {"str": "a string", "bool": "a boolean", "int": "an integer", "float": "a number"}


def coerce(value: Any, type_: ParamType, *, strict: bool = False) -> Any:
    """Convert a client value (JSON or query-string text) to the declared type. Raises ValueError.

    ``strict``: a client's JSON value, taken as the type JSON gave it (a number is no string, "5" no number), as
    the OpenAPI document says; an integral float is still an integer, as JSON Schema has it."""
    if strict and (isinstance(value, str) != (type_ == "str") or isinstance(value, bool) != (type_ == "bool")):
        raise ValueError(f"expected {_EXPECTED[type_]}")
    if type_ == "str":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("expected a string")
        return str(value)
    if type_ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError("expected a boolean")
    if isinstance(value, bool):
        raise ValueError(f"expected {'an integer' if type_ == 'int' else 'a number'}")
    if type_ == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        try:
            number = int(value)
        except (TypeError, ValueError) as exc:
            raise ValueError("expected an integer") from exc
        if abs(number) > _MAX_INT:
            raise ValueError("integer out of range")
        return number
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError) as exc:  # an integer beyond a double's range overflows
        raise ValueError("expected a finite number" if isinstance(exc, OverflowError) else "expected a number") from exc
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return result


def bind(
    query: QueryConfig, values: dict[str, Any], *, strict: bool = False, deferred: Collection[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Type every declared parameter (``strict``: see coerce) but the ``deferred`` ones, whose values come later
    (references to other sources' results). Returns the bound values and a list of problems (empty when valid)."""
    problems = [f"unknown parameter '{name}'" for name in (*values, *deferred) if name not in query.params]
    bound: dict[str, Any] = {}
    for name, type_ in query.params.items():
        if name in deferred:
            continue
        if name not in values or values[name] is None:
            problems.append(f"missing parameter '{name}' ({type_})")
            continue
        try:
            bound[name] = coerce(values[name], type_, strict=strict)
        except ValueError as exc:
            problems.append(f"parameter '{name}': {exc}")
    return bound, problems

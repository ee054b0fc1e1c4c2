"""Sources that refer to other sources' results: planned as templates when the request is, made into plans once the
sources they refer to have answered.

Values from an upstream's answer are data, never structure. In a path each goes in percent-encoded whole, so it is
at most part of one segment ('../admin' and '%2F' stay inside it), and a segment it would make empty, '.' or '..'
fails the source; the host, scheme and base path are the config's and are checked again on the joined URL. In a
query they are bound parameters of the named query, typed as it declares. A header value with a control character,
a value past limits.max_reference_bytes, a missing value, or one that is not a scalar (an object, a list, null)
fails the source with ``dependency_failed``; nothing is sent for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from app.aggregate.plans import QueryPlan, UpstreamPlan, text
from app.aggregate.refs import EACH, MissingValueError, Ref, Template, describe, lookup
from app.db.queries import coerce
from app.errors import DependencyFailedError
from app.headers import HEADER_VALUE
from app.settings import QueryConfig
from app.upstream.client import Outbound
from app.upstream.paths import UnsafePathError, join_url

MAX_HEADER_VALUE = 8192  # as a client's header value (app/aggregate/models.py)
_NO_ELEMENT = object()


class Values:
    """The parents' data a source's references read, and the current element of its for_each."""

    def __init__(self, data: Mapping[str, Any], *, limit: int, element: Any = _NO_ELEMENT) -> None:
        self._data = data
        self._limit = limit
        self._element = element

    def value(self, ref: Ref, where: str) -> str | int | float | bool:
        """The scalar ``ref`` names. Raises DependencyFailedError saying where and why (never showing the value)."""
        if ref.source == EACH:
            base, what = self._element, EACH
        else:
            base, what = self._data[ref.source], f"{ref.source}.data"
        try:
            found = lookup(base, ref.steps, what=what)
        except MissingValueError as exc:
            raise DependencyFailedError(f"{where}: {exc}") from None
        if found is None or isinstance(found, dict | list) or not isinstance(found, str | int | float):
            raise DependencyFailedError(f"{where}: ${{{ref.text}}} is {describe(found)}, not a scalar")
        if isinstance(found, str) and len(found) > self._limit // 4 and len(found.encode()) > self._limit:
            raise DependencyFailedError(
                f"{where}: ${{{ref.text}}} is {len(found.encode())} bytes, over limits.max_reference_bytes"
                f" ({self._limit})"
            )
        return found

    def typed(self, template: Template, where: str) -> Any:
        """A whole reference's value as it is; text with references in it as text."""
        whole = template.whole
        if whole is not None:
            return self.value(whole, where)
        return self.text(template, where)

    def text(self, template: Template, where: str) -> str:
        return "".join(p if isinstance(p, str) else text(self.value(p, where)) for p in template.parts)


@dataclass(frozen=True)
class UpstreamTemplate:
    upstream: str
    base_url: str
    method: str
    path: tuple[str | Ref, ...]  # literal parts percent-encoded already, and references
    params: Mapping[str, str | Template]
    body: Any  # JSON whose strings may be Templates
    headers: Mapping[str, str | Template]
    fields: tuple[str, ...] | None = None
    required: bool = False

    def make(self, values: Values) -> UpstreamPlan:
        """Raises DependencyFailedError."""
        params = {k: v if isinstance(v, str) else values.text(v, f"params.{k}") for k, v in self.params.items()}
        headers = {k: v if isinstance(v, str) else _header(values, k, v) for k, v in self.headers.items()}
        body = _fill_json(self.body, values, "json")
        out = Outbound(self.method, self._url(values), params, body, headers)
        return UpstreamPlan(self.upstream, out, self.fields, self.required)

    def _url(self, values: Values) -> Any:
        path = "".join(p if isinstance(p, str) else quote(text(values.value(p, "path")), safe="") for p in self.path)
        segments = path.split("/")[1:]
        # An empty last segment only where the template itself ends with '/': a value may not turn
        # '/items/${x}' into '/items/', another resource.
        last_empty = segments[-1] == "" and not (isinstance(self.path[-1], str) and self.path[-1].endswith("/"))
        if any(seg in (".", "..") for seg in segments) or "" in segments[:-1] or last_empty:
            raise DependencyFailedError("path: the values referred to make an empty, '.' or '..' path segment")
        try:
            return join_url(self.base_url, path)
        except UnsafePathError as exc:
            raise DependencyFailedError(f"path: {exc}") from None


def _header(values: Values, name: str, template: Template) -> str:
    value = values.text(template, f"headers.{name}")
    if not HEADER_VALUE.fullmatch(value):
        raise DependencyFailedError(f"headers.{name}: the value referred to holds a control character")
    if len(value) > MAX_HEADER_VALUE:
        raise DependencyFailedError(f"headers.{name}: the value referred to is longer than {MAX_HEADER_VALUE}")
    return value


def _fill_json(value: Any, values: Values, where: str) -> Any:
    if isinstance(value, Template):
        return values.typed(value, where)
    if isinstance(value, dict):
        return {k: _fill_json(v, values, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_json(v, values, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


@dataclass(frozen=True)
class QueryTemplate:
    query: str
    config: QueryConfig
    bound: Mapping[str, Any]  # typed already
    deferred: Mapping[str, Template]  # typed once the values exist
    fields: tuple[str, ...] | None = None
    required: bool = False

    def make(self, values: Values) -> QueryPlan:
        """Raises DependencyFailedError."""
        params = dict(self.bound)
        for name, template in self.deferred.items():
            raw = values.typed(template, f"params.{name}")
            try:
                # As a composite's text is: the query's declared type converts it (a "42" from a JSON answer is 42).
                params[name] = coerce(raw, self.config.params[name])
            except ValueError as exc:
                raise DependencyFailedError(
                    f"params.{name}: {exc} (the value referred to is {describe(raw)})"
                ) from None
        return QueryPlan(self.query, self.config, params, self.fields, self.required)


@dataclass(frozen=True)
class ChainedPlan:
    """A source that waits for the sources it refers to (``needs``), then is made into a plan; with ``for_each``,
    into one plan per element of the list it names, at most ``max_items``."""

    template: UpstreamTemplate | QueryTemplate
    needs: tuple[str, ...]
    for_each: Ref | None = None
    max_items: int = 1
    # The sources whose data its references read, so those are decoded where it can be read (not in a worker).
    reads: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.template.required

    def make(self, data: Mapping[str, Any], *, limit: int) -> UpstreamPlan | QueryPlan:
        """Raises DependencyFailedError."""
        return self.template.make(Values(data, limit=limit))

    def items(self, data: Mapping[str, Any]) -> list[Any]:
        """The elements of the for_each list. Raises DependencyFailedError when there is no such list."""
        assert self.for_each is not None
        ref, star = self.for_each, self.for_each.star
        assert star is not None
        try:
            found = lookup(data[ref.source], ref.steps[:star], what=f"{ref.source}.data")
        except MissingValueError as exc:
            raise DependencyFailedError(f"for_each: {exc}") from None
        if not isinstance(found, list):
            raise DependencyFailedError(f"for_each: ${{{ref.text}}} names {describe(found)}, not a list")
        return found

    def make_each(self, data: Mapping[str, Any], item: Any, *, limit: int) -> UpstreamPlan | QueryPlan:
        """The plan for one element. Raises DependencyFailedError (its value is missing or unusable)."""
        assert self.for_each is not None
        star = self.for_each.star
        assert star is not None
        rest = self.for_each.steps[star + 1 :]
        try:
            element = lookup(item, rest, what="the element")
        except MissingValueError as exc:
            raise DependencyFailedError(f"for_each: {exc}") from None
        return self.template.make(Values(data, limit=limit, element=element))


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill_placeholders(text_: str, values: Mapping[str, Any], encode: Callable[[str], str]) -> str:
    """A composite's literal text with its ``{param}`` placeholders filled (each value through ``encode``)."""
    return _PLACEHOLDER.sub(lambda m: encode(text(values[m[1]])) if m[1] in values else m[0], text_)

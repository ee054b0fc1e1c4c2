"""Plan the sources of an aggregate that refer to other sources (app/aggregate/chain.py): each checked against the
config as any source is, its references parsed and located, and the graph they make checked (app/aggregate/graph.py)
before anything is sent.

Only a request with a reference in it comes here: app/aggregate/plan.py asks ``spec_has_refs`` (a substring test
per value) and plans everything else as it always has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from app.aggregate import graph
from app.aggregate.chain import ChainedPlan, QueryTemplate, UpstreamTemplate, fill_placeholders
from app.aggregate.models import QuerySourceSpec, UpstreamSourceSpec
from app.aggregate.plans import Problems, QueryPlan, UpstreamPlan, text
from app.aggregate.refs import BadReferenceError, Ref, Template, has_ref, parse
from app.db.queries import bind
from app.settings import CompositeSource, Settings
from app.upstream.paths import UnsafePathError, confine_path, encode_path_text

Draft = tuple[ChainedPlan, graph.Node]


def spec_has_refs(spec: UpstreamSourceSpec | QuerySourceSpec) -> bool:
    # On every source of every request: plain loops and `in`, no generator or call per value.
    if spec.for_each is not None or spec.max_items is not None:
        return True
    for value in spec.params.values():
        if type(value) is str and "${" in value:
            return True
    if isinstance(spec, QuerySourceSpec):
        return False
    if "${" in spec.path:
        return True
    for value in spec.headers.values():
        if "${" in value:
            return True
    return spec.body is not None and _json_has_ref(spec.body)


def composite_has_refs(source: CompositeSource) -> bool:
    return source.for_each is not None or has_ref(source.path or "") or any(has_ref(v) for v in source.params.values())


def _json_has_ref(value: Any) -> bool:
    if isinstance(value, str):
        return has_ref(value)
    if isinstance(value, dict):
        return any(_json_has_ref(v) for v in value.values())
    if isinstance(value, list):
        return any(_json_has_ref(v) for v in value)
    return False


class _Reader:
    """Parses one source's texts, collecting their references (located) and problems."""

    def __init__(self, loc: str, problems: Problems) -> None:
        self.loc = loc
        self.problems = problems
        self.refs: list[tuple[str, Ref]] = []
        self.ok = True

    def parse(self, where: str, value: str) -> str | Template:
        loc = f"{self.loc}.{where}"
        try:
            parsed = parse(value)
        except BadReferenceError as exc:
            self.fail(loc, str(exc), "bad_reference")
            return value
        if isinstance(parsed, Template):
            for ref in parsed.refs:
                if ref.star is not None:
                    self.fail(loc, f"'${{{ref.text}}}': '[*]' is for for_each alone", "bad_reference")
                self.refs.append((loc, ref))
        return parsed

    def for_each(self, value: str | None, max_items: int | None, limit: int) -> tuple[Ref | None, int]:
        if value is None:
            if max_items is not None:
                self.fail(f"{self.loc}.max_items", "max_items goes with for_each", "bad_reference")
            return None, 1
        ref, problem = graph.for_each_ref(f"{self.loc}.for_each", value)
        if problem is not None:
            self.fail(problem.loc, problem.msg, problem.type)
        elif ref is not None:
            self.refs.append((f"{self.loc}.for_each", ref))
        if max_items is not None and max_items > limit:
            self.fail(f"{self.loc}.max_items", f"max_items is at most limits.max_sources ({limit})", "too_many_items")
        return ref, limit if max_items is None else max_items

    def fail(self, loc: str, msg: str, type_: str) -> None:
        self.problems.add(loc, msg, type_)
        self.ok = False

    def node(self, *, json: bool, for_each: Ref | None) -> graph.Node:
        return graph.Node(tuple(self.refs), json=json, for_each=for_each is not None)


def _path_parts(reader: _Reader, template: str, fill: Mapping[str, Any]) -> tuple[str | Ref, ...] | None:
    """A path's parts: literal ones confined and percent-encoded (``{param}`` placeholders of a composite filled,
    each value encoded whole), references kept for later."""
    parsed = reader.parse("path", template)
    parts: tuple[str | Ref, ...] = (parsed,) if isinstance(parsed, str) else parsed.parts
    # The literal text is checked as a whole path, each reference standing for one harmless character; what the
    # values make of their segments is checked once they exist (UpstreamTemplate._url).
    skeleton = "".join(p if isinstance(p, str) else "x" for p in parts)
    try:
        confine_path(skeleton)
        encoded = [encode_path_text(p) if isinstance(p, str) else p for p in parts]
    except (UnsafePathError, UnicodeDecodeError) as exc:
        reader.fail(f"{reader.loc}.path", str(exc), "unsafe_path")
        return None
    for key, value in fill.items():
        encoded = [p.replace(f"%7B{key}%7D", quote(text(value), safe="")) if isinstance(p, str) else p for p in encoded]
    return tuple(encoded)


def upstream_spec(settings: Settings, loc: str, spec: UpstreamSourceSpec, problems: Problems) -> Draft | None:
    upstream = settings.upstreams.get(spec.upstream)
    if upstream is None:
        problems.add(f"{loc}.upstream", f"unknown upstream '{spec.upstream}'", "unknown_upstream")
        return None
    refused = sorted(h for h in spec.headers if h.lower() not in upstream.forward_headers)
    if refused:
        problems.add(
            f"{loc}.headers", f"headers not allowed for this upstream: {', '.join(refused)}", "header_not_allowed"
        )
        return None
    reader = _Reader(loc, problems)
    path = _path_parts(reader, spec.path, {})
    params = {k: reader.parse(f"params.{k}", v) if isinstance(v, str) else text(v) for k, v in spec.params.items()}
    headers = {k: reader.parse(f"headers.{k}", v) for k, v in spec.headers.items()}
    body = _parse_json(reader, "json", spec.body)
    for_each, max_items = reader.for_each(spec.for_each, spec.max_items, settings.limits.max_sources)
    if path is None or not reader.ok:
        return None
    template = UpstreamTemplate(spec.upstream, upstream.base_url, spec.method, path, params, body, headers)
    return ChainedPlan(template, (), for_each, max_items), reader.node(json=spec.method != "HEAD", for_each=for_each)


def _parse_json(reader: _Reader, where: str, value: Any) -> Any:
    if isinstance(value, str):
        return reader.parse(where, value)
    if isinstance(value, dict):
        return {k: _parse_json(reader, f"{where}.{k}", v) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_json(reader, f"{where}[{i}]", v) for i, v in enumerate(value)]
    return value


def query_spec(settings: Settings, loc: str, spec: QuerySourceSpec, problems: Problems) -> Draft | None:
    query = settings.queries.get(spec.query)
    if query is None:
        problems.add(f"{loc}.query", f"unknown query '{spec.query}'", "unknown_query")
        return None
    reader = _Reader(loc, problems)
    static: dict[str, Any] = {}
    deferred: dict[str, Template] = {}
    for key, value in spec.params.items():
        parsed = reader.parse(f"params.{key}", value) if isinstance(value, str) else value
        if isinstance(parsed, Template):
            deferred[key] = parsed
        else:
            static[key] = parsed
    for_each, max_items = reader.for_each(spec.for_each, spec.max_items, settings.limits.max_sources)
    bound, errors = bind(query, static, strict=True, deferred=deferred)
    for msg in errors:
        reader.fail(f"{loc}.params", msg, "bad_param")
    if not reader.ok:
        return None
    template = QueryTemplate(spec.query, query, bound, deferred)
    return ChainedPlan(template, (), for_each, max_items), reader.node(json=True, for_each=for_each)


def composite_source(
    settings: Settings, loc: str, source: CompositeSource, values: Mapping[str, Any], problems: Problems
) -> Draft | None:
    """A composite's source with references: its ``{param}`` placeholders filled from ``values`` (checked by
    plan_composite) and its references kept for later. Its upstream or query exists (the settings checked)."""
    reader = _Reader(loc, problems)
    fields = tuple(source.fields) if source.fields is not None else None
    if source.upstream is not None:
        upstream = settings.upstreams[source.upstream]
        path = _path_parts(reader, source.path or "", values)
        params: dict[str, str | Template] = {}
        for key, value in source.params.items():
            parsed = reader.parse(f"params.{key}", value)
            params[key] = _fill(parsed, values)
        for_each, max_items = reader.for_each(source.for_each, source.max_items, settings.limits.max_sources)
        if path is None or not reader.ok:
            return None
        template: UpstreamTemplate | QueryTemplate = UpstreamTemplate(
            source.upstream, upstream.base_url, source.method, path, params, None, {}, fields, source.required
        )
        return ChainedPlan(template, (), for_each, max_items), reader.node(
            json=source.method != "HEAD", for_each=for_each
        )
    assert source.query is not None
    query = settings.queries[source.query]
    static: dict[str, Any] = {}
    deferred: dict[str, Template] = {}
    for key, value in source.params.items():
        parsed = reader.parse(f"params.{key}", value)
        if isinstance(parsed, Template):
            filled = _fill(parsed, values)
            assert isinstance(filled, Template)
            deferred[key] = filled
        else:
            # A template that is exactly one placeholder keeps the typed value, as app/aggregate/plan.py's _fill.
            whole = parsed[1:-1] if parsed.startswith("{") and parsed.endswith("}") else ""
            static[key] = values[whole] if whole in values else _fill(parsed, values)
    for_each, max_items = reader.for_each(source.for_each, source.max_items, settings.limits.max_sources)
    bound, errors = bind(query, static, deferred=deferred)
    for msg in errors:
        reader.fail(f"{loc}.params", msg, "bad_param")
    if not reader.ok:
        return None
    template = QueryTemplate(source.query, query, bound, deferred, fields, source.required)
    return ChainedPlan(template, (), for_each, max_items), reader.node(json=True, for_each=for_each)


def _fill(parsed: str | Template, values: Mapping[str, Any]) -> str | Template:
    if isinstance(parsed, str):
        return fill_placeholders(parsed, values, str)
    return Template(tuple(fill_placeholders(p, values, str) if isinstance(p, str) else p for p in parsed.parts))


def link(
    settings: Settings,
    plans: dict[str, UpstreamPlan | QueryPlan | ChainedPlan],
    nodes: Mapping[str, graph.Node],
    problems: Problems,
) -> None:
    """Check the graph the references make (every source of the aggregate in ``nodes``, those without references
    too), and give each chained plan the sources it waits for. Problems go to ``problems``, located."""
    checked = graph.check(nodes, max_depth=settings.limits.max_chain_depth)
    for problem in checked.problems:
        problems.add(problem.loc, problem.msg, problem.type)
    for name, plan in plans.items():
        if isinstance(plan, ChainedPlan):
            plans[name] = dataclasses.replace(plan, needs=checked.needs.get(name, ()))

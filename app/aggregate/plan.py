"""Plan an aggregate: every source checked against the config and resolved to what will be sent, before anything
is. Raises the request's problems all at once (ValidationFailedError), so a client fixes them in one go."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from app.aggregate import graph, plan_chain
from app.aggregate.chain import ChainedPlan
from app.aggregate.models import AggregateRequest, QuerySourceSpec, UpstreamSourceSpec
from app.aggregate.plans import Problems, QueryPlan, UpstreamPlan, text
from app.db.queries import bind, coerce
from app.errors import NotFoundError, TooManySourcesError
from app.settings import CompositeConfig, CompositeSource, Settings
from app.upstream.client import Outbound
from app.upstream.paths import UnsafePathError, confine_path, join_url, target_url

# What a composite's value may not hold when it goes in a path (app/aggregate/schema.py says the same).
UNSAFE_IN_PATH = re.compile(r"[/\\\x00-\x1f\x7f]")
UNSAFE_IN_PATH_PATTERN = r"^[^/\\\x00-\x1f\x7f]*$"


Plan = UpstreamPlan | QueryPlan | ChainedPlan


def _plan_upstream(settings: Settings, loc: str, spec: UpstreamSourceSpec, problems: Problems) -> UpstreamPlan | None:
    upstream = settings.upstreams.get(spec.upstream)
    if upstream is None:
        problems.add(f"{loc}.upstream", f"unknown upstream '{spec.upstream}'", "unknown_upstream")
        return None
    try:
        url = target_url(upstream.base_url, spec.path)
    except (UnsafePathError, UnicodeDecodeError) as exc:
        problems.add(f"{loc}.path", str(exc), "unsafe_path")
        return None
    refused = sorted(h for h in spec.headers if h.lower() not in upstream.forward_headers)
    if refused:
        problems.add(
            f"{loc}.headers", f"headers not allowed for this upstream: {', '.join(refused)}", "header_not_allowed"
        )
        return None
    params = {k: _text(v) for k, v in spec.params.items()}
    return UpstreamPlan(spec.upstream, Outbound(spec.method, url, params, spec.body, dict(spec.headers)))


def plan_request(settings: Settings, request: AggregateRequest) -> dict[str, Plan]:
    """Resolve every source against the config. Raises ValidationFailedError naming each problem."""
    limit = settings.limits.max_sources
    if len(request.sources) > limit:
        msg = f"at most {limit} sources per request"
        raise TooManySourcesError(msg, errors=[{"loc": "sources", "msg": msg, "type": "too_many_sources"}])
    problems = Problems()
    plans: dict[str, Plan] = {}
    nodes: dict[str, graph.Node] | None = None  # only when a source refers to another: decided here, once
    for name, spec in request.sources.items():
        loc = f"sources.{name}"
        plan: Plan | None
        if plan_chain.spec_has_refs(spec):
            nodes = {} if nodes is None else nodes
            draft = (
                plan_chain.upstream_spec(settings, loc, spec, problems)
                if isinstance(spec, UpstreamSourceSpec)
                else plan_chain.query_spec(settings, loc, spec, problems)
            )
            if draft is not None:
                plans[name], nodes[name] = draft
            continue
        if isinstance(spec, UpstreamSourceSpec):
            plan = _plan_upstream(settings, loc, spec, problems)
        else:
            plan = _plan_query(settings, loc, spec, problems)
        if plan is not None:
            plans[name] = plan
    if nodes is not None:
        for name, spec in request.sources.items():
            nodes.setdefault(name, graph.Node(json=not isinstance(spec, UpstreamSourceSpec) or spec.method != "HEAD"))
        plan_chain.link(settings, plans, nodes, problems)
    problems.raise_if_any("aggregate request")
    return plans


def _plan_query(
    settings: Settings, loc: str, spec: QuerySourceSpec, problems: Problems, *, strict: bool = True
) -> QueryPlan | None:
    query = settings.queries.get(spec.query)
    if query is None:
        problems.add(f"{loc}.query", f"unknown query '{spec.query}'", "unknown_query")
        return None
    bound, errors = bind(query, dict(spec.params), strict=strict)
    for msg in errors:
        problems.add(f"{loc}.params", msg, "bad_param")
    return None if errors else QueryPlan(spec.query, query, bound)


def plan_composite(settings: Settings, name: str, query: Mapping[str, str]) -> tuple[CompositeConfig, dict[str, Plan]]:
    """Fill a declared composite's templates from typed query parameters.

    Raises NotFoundError for an unknown composite, ValidationFailedError for missing, unknown or mistyped params.
    """
    composite = settings.composites.get(name)
    if composite is None:
        raise NotFoundError(f"unknown composite '{name}'")
    problems = Problems()
    values: dict[str, Any] = {}
    for key in query:
        if key not in composite.params:
            problems.add(f"query.{key}", f"unknown parameter '{key}'", "unknown_param")
    for key, type_ in composite.params.items():
        if key not in query:
            problems.add(f"query.{key}", f"missing parameter '{key}' ({type_})", "missing_param")
            continue
        try:
            values[key] = coerce(query[key], type_)
        except ValueError as exc:
            problems.add(f"query.{key}", f"parameter '{key}': {exc}", "bad_param")
    whole = _path_segment_fields(composite)
    for key in sorted(_path_fields(composite) & set(values)):
        text = _text(values[key])
        if UNSAFE_IN_PATH.search(text):
            msg = f"parameter '{key}' goes in a path: it cannot hold '/', '\\' or control characters"
            problems.add(f"query.{key}", msg, "bad_param")
        elif key in whole and text in ("", ".", ".."):
            msg = f"parameter '{key}' fills a path segment: it cannot be empty, '.' or '..'"
            problems.add(f"query.{key}", msg, "bad_param")
    problems.raise_if_any("composite request")
    plans: dict[str, Plan] = {}
    nodes: dict[str, graph.Node] | None = None
    for sname, source in composite.sources.items():
        plan: Plan | None
        if plan_chain.composite_has_refs(source):
            nodes = {} if nodes is None else nodes
            draft = plan_chain.composite_source(settings, f"sources.{sname}", source, values, problems)
            if draft is not None:
                plans[sname], nodes[sname] = draft
            continue
        plan = _plan_composite_source(settings, f"sources.{sname}", source, values, problems)
        if plan is not None:
            plans[sname] = plan
    if nodes is not None:
        # The settings checked this graph when they were loaded; here it gives each source what it waits for.
        for sname, source in composite.sources.items():
            nodes.setdefault(sname, graph.Node(json=source.method != "HEAD" or source.upstream is None))
        plan_chain.link(settings, plans, nodes, problems)
    problems.raise_if_any("composite request")
    return composite, plans


def _plan_composite_source(
    settings: Settings, loc: str, source: CompositeSource, values: dict[str, Any], problems: Problems
) -> Plan | None:
    fields = tuple(source.fields) if source.fields is not None else None
    if source.upstream is not None:
        assert source.path is not None
        upstream = settings.upstreams.get(source.upstream)
        if upstream is None:
            problems.add(f"{loc}.upstream", f"unknown upstream '{source.upstream}'", "unknown_upstream")
            return None
        try:
            # The operator's template is confined as any path; then each value goes in percent-encoded whole and
            # is never decoded again, so that it can never add a query or a fragment. Values that could add or
            # climb a segment (a '/', a '\\', '.' or '..' alone) were refused above; the check below catches
            # what two values side by side could still make.
            path = confine_path(source.path)
            for key, value in values.items():
                path = path.replace(f"%7B{key}%7D", quote(_text(value), safe=""))
            segments = path.split("/")[1:]
            if any(seg in (".", "..") for seg in segments) or "" in segments[:-1]:
                raise UnsafePathError("the parameters make an empty, '.' or '..' path segment")
            url = join_url(upstream.base_url, path)
        except (UnsafePathError, UnicodeDecodeError) as exc:
            problems.add(f"{loc}.path", str(exc), "unsafe_path")
            return None
        params = {k: _text(_fill(t, values)) for k, t in source.params.items()}
        return UpstreamPlan(source.upstream, Outbound(source.method, url, params), fields, source.required)
    assert source.query is not None
    # Built from the validated config and typed values, not from a client's JSON: not validated again. Templates
    # make text, which the query's declared types then convert (not strict, unlike a client's JSON).
    spec = QuerySourceSpec.model_construct(
        query=source.query, params={k: _fill(t, values) for k, t in source.params.items()}
    )
    qplan = _plan_query(settings, loc, spec, problems, strict=False)
    if qplan is None:
        return None
    return QueryPlan(qplan.query, qplan.config, qplan.params, fields, source.required)


def path_segment_fields(source: CompositeSource) -> set[str]:
    """The template fields that make a whole segment of the source's path ('/users/{user_id}')."""
    segments = (source.path or "").split("/")
    return {seg[1:-1] for seg in segments if seg.startswith("{") and seg.endswith("}") and seg[1:-1].isidentifier()}


def path_fields(source: CompositeSource) -> set[str]:
    """The template fields anywhere in the source's path."""
    return {name for _, name, _, _ in string.Formatter().parse(source.path or "") if name}


def _path_segment_fields(composite: CompositeConfig) -> set[str]:
    return {name for source in composite.sources.values() for name in path_segment_fields(source)}


def _path_fields(composite: CompositeConfig) -> set[str]:
    return {name for source in composite.sources.values() for name in path_fields(source)}


def _fill(template: str, values: dict[str, Any]) -> Any:
    # A template that is exactly one placeholder keeps the typed value; anything else becomes text.
    if template.startswith("{") and template.endswith("}") and template[1:-1] in values:
        return values[template[1:-1]]
    return template.format_map({k: _text(v) for k, v in values.items()})


def effective_deadline_s(settings: Settings, requested_ms: float | None) -> float:
    limits = settings.limits
    ms = limits.default_deadline_ms if requested_ms is None else requested_ms
    return min(ms, limits.max_deadline_ms) / 1000


_text = text  # plan_composite has a local `text`

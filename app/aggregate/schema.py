"""The OpenAPI description of /aggregate for one configuration: the request models' schemas, narrowed to what this
gateway serves (its upstream, query and composite names, each query's and composite's typed parameters), so that a
request is valid by the document exactly when the gateway takes it.

Built once per app (app/openapi.py caches the document); nothing here runs per request.
"""

from __future__ import annotations

import copy
from typing import Any

from app.aggregate.models import AggregateRequest, AggregateResponse, FlatAggregateResponse
from app.aggregate.plan import UNSAFE_IN_PATH_PATTERN, path_fields, path_segment_fields
from app.settings import CompositeConfig, ParamType, QueryConfig, Settings, UpstreamConfig

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"
_MAX_INT = 2**63 - 1
_MAX_DOUBLE = 1.7976931348623157e308

# A path on an upstream, as app/upstream/paths.py confines it: '/'-separated segments, none '.' or '..', none
# empty but the last; no control character, backslash, '?' or '#'. Percent-escapes are left out: the rules for
# what they may decode to are more than a pattern says well, so the document promises only the plain form.
_CHAR = r"[^\x00-\x1f\x7f/\\?#%]"
_NOT_DOT = r"[^\x00-\x1f\x7f/\\?#%.]"
_SEGMENT = rf"(?:{_NOT_DOT}{_CHAR}*|\.{_NOT_DOT}{_CHAR}*|\.\.{_CHAR}+)"
PATH_PATTERN = rf"^/(?:{_SEGMENT}/)*(?:{_SEGMENT})?$"


REFERENCES = (
    "Sources by name. A source's values (an upstream source's path, params, json body values and headers; a query"
    " source's params) may refer to another source's result: `${profile.data.org_id}`, `${orders.data[0].id}`,"
    ' `${page.data["odd key"]}` (a path: source, data, keys, indexes; never an expression). The source then starts'
    " once every source it refers to has succeeded, with the value percent-encoded whole into a path segment, as"
    " text in params and headers, typed in a json body or a query parameter (as the query declares); `$${` is a"
    " literal `${`. When a parent failed or was skipped, or the value is missing, not a scalar or unusable, the"
    ' source is not called and fails with `dependency_failed`. `for_each: "${orders.data[*].id}"` (with'
    " `max_items`, at most limits.max_sources) makes one call per element, each reading it as `${each}` (or"
    " `${each.key}`), and answers the list of their results; a longer list fails with `too_many_items`. References"
    " to unknown sources, cycles, chains longer than limits.max_chain_depth and references to a HEAD are refused"
    " with 422, each located. Not in this schema, which cannot say which names a reference may use: `for_each`,"
    " `max_items`, and reference-valued query parameters of a type other than str."
)


def json_param(type_: ParamType) -> Schema:
    """A query parameter's value in a client's JSON, as app/db/queries.py's strict coerce takes it."""
    if type_ == "int":
        return {"type": "integer", "minimum": -_MAX_INT, "maximum": _MAX_INT}
    if type_ == "float":
        return {"type": "number", "minimum": -_MAX_DOUBLE, "maximum": _MAX_DOUBLE}
    if type_ == "bool":
        return {"type": "boolean"}
    return {"type": "string", "maxLength": 4096}


def request_components(settings: Settings) -> dict[str, Schema]:
    """Component schemas of POST /aggregate's body: ``AggregateRequest`` and one per configured upstream and query,
    which its ``sources`` choose between."""
    schema = AggregateRequest.model_json_schema(ref_template=REF)
    defs: dict[str, Schema] = schema.pop("$defs", {})
    generic_upstream, generic_query = defs["UpstreamSourceSpec"], defs["QuerySourceSpec"]
    components: dict[str, Schema] = {}
    for name, upstream in settings.upstreams.items():
        components[f"UpstreamSource_{name}"] = _upstream_source(generic_upstream, name, upstream)
    for name, query in settings.queries.items():
        components[f"QuerySource_{name}"] = _query_source(generic_query, name, query)
    sources = schema["properties"]["sources"]
    sources["maxProperties"] = settings.limits.max_sources
    sources["description"] = REFERENCES
    refs = [{"$ref": REF.format(model=model)} for model in components]
    # No two of these match the same source (each names its own upstream or query): oneOf as much as anyOf.
    ((name_pattern, _),) = sources["patternProperties"].items()
    sources["patternProperties"] = {name_pattern: {"oneOf": refs} if refs else False}
    sources["additionalProperties"] = False
    examples = [kept for e in schema.pop("examples", []) if (kept := _example_for(settings, e)) is not None]
    if examples:
        schema["examples"] = examples
    components["AggregateRequest"] = schema
    return components


def _example_for(settings: Settings, example: dict[str, Any]) -> dict[str, Any] | None:
    """The model's example with only the sources this configuration has (the demo's names), or None."""
    kept = {
        name: source
        for name, source in example["sources"].items()
        if source.get("upstream") in settings.upstreams
        or (
            source.get("query") in settings.queries
            and set(source.get("params", {})) == set(settings.queries[source["query"]].params)
        )
    }
    return {**example, "sources": kept} if kept else None


def _upstream_source(generic: Schema, name: str, upstream: UpstreamConfig) -> Schema:
    schema = copy.deepcopy(generic)
    schema["title"] = f"Source on upstream {name}"
    properties = schema["properties"]
    # Described in words (REFERENCES), not as properties: what makes them valid (the names of the request's other
    # sources) is more than JSON Schema says, and a document whose every valid request is taken must leave them out.
    properties.pop("for_each", None)
    properties.pop("max_items", None)
    properties["upstream"] = {"const": name}
    properties["path"] = {**properties["path"], "pattern": PATH_PATTERN}
    headers = properties["headers"]
    allowed = sorted(upstream.forward_headers)
    if not allowed:
        properties["headers"] = {"type": "object", "maxProperties": 0, "description": "None may be forwarded."}
    else:
        # Names are case-insensitive; each may be given once, in any case.
        value = next(iter(headers["patternProperties"].values()))
        headers["patternProperties"] = {_any_case(allowed): value}
        headers["additionalProperties"] = False
        headers["maxProperties"] = len(allowed)
        headers["description"] = f"Forwarded to {name}: {', '.join(allowed)} (each once, in any case)."
    return schema


def _any_case(names: list[str]) -> str:
    spelled = ("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else _escape(c) for c in n) for n in names)
    return f"^(?:{'|'.join(spelled)})$"


def _escape(char: str) -> str:
    return "\\" + char if char in r".^$*+?()[]{}|\/-" else char


def _query_source(generic: Schema, name: str, query: QueryConfig) -> Schema:
    schema = copy.deepcopy(generic)
    schema["title"] = f"Query {name}"
    params: Schema = {
        "type": "object",
        "properties": {key: json_param(type_) for key, type_ in query.params.items()},
        "additionalProperties": False,
    }
    if query.params:
        params["required"] = sorted(query.params)
        schema["required"] = ["query", "params"]
    schema["properties"] = {"query": {"const": name}, "params": params}
    return schema


def _text_param(type_: ParamType, *, in_path: bool, whole_segment: bool) -> Schema:
    """A composite's parameter in the query string, as app/db/queries.py's coerce reads text."""
    if type_ != "str":
        return json_param(type_)
    if not in_path:
        return {"type": "string"}
    # It goes in a path: app/aggregate/plan.py refuses what could add, empty or climb a segment.
    schema: Schema = {"type": "string", "pattern": UNSAFE_IN_PATH_PATTERN}
    if whole_segment:
        schema.update({"minLength": 1, "not": {"enum": [".", ".."]}})
    return schema


def composite_paths(settings: Settings, generic: Schema) -> dict[str, Schema]:
    """One path per configured composite, from the generic ``GET /aggregate/{composite}`` operation: its typed
    query parameters, each required."""
    paths: dict[str, Schema] = {}
    for name, composite in settings.composites.items():
        operation = copy.deepcopy(generic)
        operation["operationId"] = f"composite_{name}"
        operation["summary"] = f"Composite {name}"
        operation["parameters"] = _composite_parameters(composite)
        paths[f"/aggregate/{name}"] = {"get": operation}
    return paths


def _composite_parameters(composite: CompositeConfig) -> list[Schema]:
    whole = {field for source in composite.sources.values() for field in path_segment_fields(source)}
    in_path = {field for source in composite.sources.values() for field in path_fields(source)}
    return [
        {
            "name": key,
            "in": "query",
            "required": True,
            "schema": _text_param(type_, in_path=key in in_path, whole_segment=key in whole),
        }
        for key, type_ in composite.params.items()
    ]


def response_components() -> dict[str, Schema]:
    components: dict[str, Schema] = {}
    for model in (AggregateResponse, FlatAggregateResponse):
        schema = model.model_json_schema(ref_template=REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components

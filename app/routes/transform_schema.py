"""The OpenAPI description of POST /transform/{name} for the transforms this gateway serves: one path per transform,
its JSON body narrowed to the ranks and element type it declares and to its own params schema (what GET /transform
lists), so that the document refuses what the transform refuses wherever JSON Schema can say it.

What it cannot say stays in words: that nested lists are rectangular, an axis within the data's rank, a transform's
own value check, and what makes a ``.npy`` file. Built once per app, with the document (app/openapi.py).
"""

from __future__ import annotations

import copy
from typing import Any

from app.settings import Settings
from app.worker.registry import discover_plugins, load_registry
from app.worker.spec import INTEGER_DTYPES, TransformDefinitionError, TransformSpec

Schema = dict[str, Any]


def data_schema(ranks: range, element: Schema) -> Schema:
    """A number (rank 0) or non-empty lists nested to exactly one of ``ranks``. The element limit is left to words
    (GET /transform): a fuzzer probing a bound of millions would build bodies of many megabytes."""
    alternatives = []
    for rank in ranks:
        schema = element
        for _ in range(rank):
            schema = {"type": "array", "minItems": 1, "items": schema}
        alternatives.append(schema)
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _body(spec: TransformSpec) -> Schema:
    integers = all(dtype in INTEGER_DTYPES for dtype in spec.dtypes)
    element: Schema = {"type": "integer" if integers else "number"}
    params = spec.params.model_json_schema()
    if "$defs" in params:  # a params model with nested models: described at GET /transform
        params = {"type": "object"}
    params["description"] = f"The parameters of {spec.name}; none when left out."
    return {
        "type": "object",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {
            "data": {
                **data_schema(range(spec.min_rank, spec.max_rank + 1), element),
                "description": f"A number or a rectangular nested list of numbers: {spec.description}",
            },
            "params": params,
        },
    }


def transform_paths(settings: Settings, generic: Schema) -> dict[str, Schema]:
    """One path per listed transform, from the generic ``POST /transform/{name}`` operation; the generic path as it
    is when the gateway runs no transforms (the route then answers 503) or its registry cannot be loaded (the
    gateway then does not start)."""
    compute = settings.compute
    if not compute.enabled:
        return {"/transform/{name}": {"post": generic}}
    try:
        registry = load_registry(discover_plugins() if compute.load_plugins else [])
    except TransformDefinitionError:
        return {"/transform/{name}": {"post": generic}}
    paths: dict[str, Schema] = {}
    for name, spec in registry.items():
        if spec.internal:
            continue
        operation = copy.deepcopy(generic)
        operation["operationId"] = f"transform_{name}"
        operation["summary"] = f"Transform {name}"
        operation["parameters"] = [p for p in operation.get("parameters", []) if p.get("name") != "name"]
        content = operation["requestBody"]["content"]
        content["application/json"]["schema"] = _body(spec)
        content["application/json"].pop("example", None)
        if spec.min_rank <= 1 <= spec.max_rank:
            integers = all(dtype in INTEGER_DTYPES for dtype in spec.dtypes)
            content["application/json"]["example"] = {"data": [1, 2, 3] if integers else [0.5, 1.0, 2.0]}
        paths[f"/transform/{name}"] = {"post": operation}
    return paths

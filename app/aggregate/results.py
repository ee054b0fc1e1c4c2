"""Each source's result, and the flat merge of a composite's results."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from app.aggregate.models import CacheOutcome, SourceErrorBody, SourceResult
from app.errors import SourceError


def merge_flat(results: Mapping[str, SourceResult]) -> dict[str, Any]:
    """One flat object: the keys of every successful object result, later sources never overwriting earlier
    ones (a clash is kept under "<source>.<key>"); non-object results sit under their source's name."""
    merged: dict[str, Any] = {}
    for name, result in results.items():
        data = result["data"]
        if not result["ok"]:
            continue
        if isinstance(data, dict):
            for key, value in data.items():
                merged[key if key not in merged else f"{name}.{key}"] = value
        else:
            merged[name] = data
    return merged


def ok(
    status: int | None, data: Any, started: float, attempts: int, origin: float, cache: CacheOutcome | None = None
) -> SourceResult:
    """``started``: when the source started (perf_counter); ``origin``: when the request did; ``cache``: how the
    upstream's cache took part."""
    return {
        "ok": True,
        "status": status,
        "data": data,
        "error": None,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": attempts,
        "cache": cache,
        "started_ms": round((started - origin) * 1000, 1),
        "waited_for": [],
    }


def failed(
    err: SourceError, started: float, attempts: int, origin: float, cache: CacheOutcome | None = None
) -> SourceResult:
    return {
        "ok": False,
        "status": err.status,
        "data": None,
        # kind is one of ErrorType (each SourceError leaf sets one); said to mypy without a cast's call.
        "error": {"type": err.kind, "message": err.message},  # type: ignore[typeddict-item]
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": attempts,
        "cache": cache,
        "started_ms": round((started - origin) * 1000, 1),
        "waited_for": [],
    }


def fanned_out(items: list[SourceResult], started: float, origin: float) -> SourceResult:
    """A for_each source's result: ``data`` is the list of its elements' results; it is ok when every one is, else
    its error is the first failed element's, saying how many failed."""
    failures = [(i, r) for i, r in enumerate(items) if not r["ok"]]
    error: SourceErrorBody | None = None
    if failures:
        first, result = failures[0]
        assert result["error"] is not None
        message = f"{len(failures)} of {len(items)} calls failed; element {first}: {result['error']['message']}"
        error = {"type": result["error"]["type"], "message": message}
    return {
        "ok": not failures,
        "status": None,
        "data": items,
        "error": error,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": sum(r["attempts"] for r in items),
        "cache": None,
        "started_ms": round((started - origin) * 1000, 1),
        "waited_for": [],
    }

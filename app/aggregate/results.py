"""Each source's result, and the flat merge of a composite's results."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from app.aggregate.models import CacheOutcome, SourceResult
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


def ok(status: int | None, data: Any, started: float, attempts: int, cache: CacheOutcome | None = None) -> SourceResult:
    return {
        "ok": True,
        "status": status,
        "data": data,
        "error": None,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": attempts,
        "cache": cache,
    }


def failed(err: SourceError, started: float, attempts: int, cache: CacheOutcome | None = None) -> SourceResult:
    return {
        "ok": False,
        "status": err.status,
        "data": None,
        "error": {"type": err.kind, "message": err.message},
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": attempts,
        "cache": cache,
    }

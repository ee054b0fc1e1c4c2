"""JSON work on large upstream bodies, done in a worker process so that the event loop only moves bytes.

orjson decodes object-heavy JSON at roughly 40 MB/s in one C call that never releases the GIL: a 6 MB body would
stall the loop (or, from a thread, everything else) for about 150 ms. In a worker the same work costs the loop
nothing; results come back as already-encoded JSON fragments that the gateway embeds without parsing.
"""

from __future__ import annotations

from typing import Any

import orjson

Digest = tuple[str, Any]


def select(data: Any, fields: tuple[str, ...] | None) -> Any:
    if fields is None:
        return data
    if isinstance(data, dict):
        return {k: data[k] for k in fields if k in data}
    if isinstance(data, list):
        return [select(item, fields) for item in data]
    return data


def digest_json(raw: bytes, fields: tuple[str, ...] | None, split_keys: bool) -> Digest:
    """Validate ``raw`` as JSON and keep only ``fields``. Returns ("json", bytes) with the re-encoded (or, when
    nothing changed, the original) document; with ``split_keys`` and an object, ("items", [(key, bytes), ...]);
    or ("error", message) for a body that is not JSON (exceptions with custom signatures do not pickle well)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return ("error", f"invalid JSON: {exc}")
    data = select(data, fields)
    if split_keys and isinstance(data, dict):
        return ("items", [(str(k), orjson.dumps(v)) for k, v in data.items()])
    return ("json", raw if fields is None else orjson.dumps(data))

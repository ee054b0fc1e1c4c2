"""Duplicate keys in a JSON document: RFC 8259 leaves their meaning open, and orjson and pydantic silently keep the
last one, so a body that says two things reaches the gateway as one of them. The gateway refuses such a body (422).

``duplicate_keys`` is the exact check, a second parse with the standard library (about 5 µs for a typical
/aggregate body, as much as the validation itself); callers run it only when a cheaper count cannot rule duplicates
out (app/routes/aggregate.py).
"""

from __future__ import annotations

import json
from typing import Any

Location = tuple[str | int, ...]


def duplicate_keys(raw: bytes | bytearray | str) -> list[Location]:
    """The location of every key given twice in the same object (the key last), in document order; [] for a
    document without any, and for one that is not JSON at all (its parser reports that)."""
    found: dict[int, tuple[dict[str, Any], list[str]]] = {}

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            twice = []
            for key, _ in pairs:
                if key in seen and key not in twice:
                    twice.append(key)
                seen.add(key)
            # The object is kept alive with its entry, so that its id is never reused by another one.
            found[id(obj)] = (obj, twice)
        return obj

    try:
        tree = json.loads(raw, object_pairs_hook=pairs_hook)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return []
    if not found:
        return []
    locations: list[Location] = []
    # Depth-first, in document order, through the values that survived (a later duplicate replaced the others).
    stack: list[tuple[Location, Any]] = [((), tree)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            entry = found.get(id(value))
            if entry is not None and entry[0] is value:
                locations.extend((*path, key) for key in entry[1])
            stack.extend(((*path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(value))))
    if not locations:
        # Only inside values that later duplicates replaced: still a duplicate, at an unknown depth.
        locations = [(entry[1][0],) for entry in found.values()]
    return locations

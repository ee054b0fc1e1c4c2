"""How deeply a JSON text nests, found without parsing it: a few vectorised passes over the bytes.

Parsers recurse (the standard library's json raises RecursionError near 1,000 levels, orjson refuses to encode
past 255), so a body of a megabyte of '[' must be refused before any of them sees it. Counting brackets is not
enough, since strings may hold brackets and escaped quotes; the quote parity below handles both, in linear time
(a regular expression for strings can take quadratic time on crafted escapes).
"""

from __future__ import annotations

import numpy as np

_QUOTE = ord('"')
_BACKSLASH = ord("\\")


def _step_table() -> np.ndarray[tuple[int], np.dtype[np.int8]]:
    table = np.zeros(256, dtype=np.int8)
    table[[ord("["), ord("{")]] = 1
    table[[ord("]"), ord("}")]] = -1
    return table


_STEP = _step_table()


def max_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw``; 0 for a scalar. Exact for valid JSON; for invalid
    JSON a number that the parser's own rejection makes moot."""
    if not raw:
        return 0
    a = np.frombuffer(raw, dtype=np.uint8)
    quote = a == _QUOTE
    if quote.any():
        backslash = a == _BACKSLASH
        if backslash.any():
            # A quote is escaped when an odd number of backslashes runs up to it.
            idx = np.arange(a.size, dtype=np.int32)
            last_plain = np.maximum.accumulate(np.where(backslash, -1, idx))
            run = np.zeros(a.size, dtype=np.int32)
            run[1:] = idx[:-1] - last_plain[:-1]
            quote &= (run & 1) == 0
        # Odd running count of real quotes: inside a string, where brackets are text.
        inside = (np.cumsum(quote, dtype=np.int32) & 1).astype(bool)
    else:
        inside = None
    step = _STEP[a]
    if inside is not None:
        step[inside] = 0
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def exceeds_depth(raw: bytes, limit: int) -> bool:
    """True when ``raw`` nests deeper than ``limit``. Cheap when it cannot: fewer openers than the limit."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return max_depth(raw) > limit

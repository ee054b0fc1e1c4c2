"""A stored answer: what the gateway needs of it (status, body, the headers that say how to read it) and how long
it may be served; and its bytes in a shared backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

# Of the upstream's headers, those that say how to read the body or how it was cached; nothing else is kept (a
# Set-Cookie, say, is never stored).
KEPT_HEADERS = ("content-type", "content-language", "cache-control", "expires", "vary", "etag", "last-modified")
# What an entry costs besides its body and key, roughly: counted against max_bytes so that many tiny entries
# cannot hold far more memory than the budget says.
ENTRY_OVERHEAD = 256
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(repr=False)
    stored_at: float  # wall-clock seconds (shared by replicas, whose monotonic clocks are not)
    age_s: float  # its age when it arrived
    lifetime_s: float
    stale_s: float  # how long past expiry it may still be served while the upstream fails
    with_credentials: bool  # may answer a request that forwarded Authorization or Cookie

    def age(self, now: float) -> float:
        return self.age_s + max(0.0, now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.lifetime_s

    def usable_stale(self, now: float) -> bool:
        return self.age(now) < self.lifetime_s + self.stale_s

    def keep_until(self) -> float:
        """When it is of no more use, fresh or stale (wall-clock seconds)."""
        return self.stored_at + self.lifetime_s + self.stale_s - self.age_s

    def size(self, key: str) -> int:
        return len(self.body) + len(key) + sum(len(k) + len(v) for k, v in self.headers.items()) + ENTRY_OVERHEAD


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name in KEPT_HEADERS if (value := headers.get(name)) is not None}


def encode(entry: Entry) -> bytes:
    meta = {
        "v": _FORMAT,
        "s": entry.status,
        "h": dict(entry.headers),
        "t": entry.stored_at,
        "a": entry.age_s,
        "l": entry.lifetime_s,
        "x": entry.stale_s,
        "c": entry.with_credentials,
    }
    # orjson writes no newline: the first one ends the metadata.
    return orjson.dumps(meta) + b"\n" + entry.body


def decode(raw: bytes) -> Entry | None:
    """None for bytes that are not an entry of this format (another version's, or damaged)."""
    meta_raw, sep, body = raw.partition(b"\n")
    if not sep:
        return None
    try:
        meta = orjson.loads(meta_raw)
        if not isinstance(meta, dict) or meta.get("v") != _FORMAT:
            return None
        headers = meta["h"]
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            return None
        return Entry(
            status=int(meta["s"]),
            body=body,
            headers=headers,
            stored_at=float(meta["t"]),
            age_s=float(meta["a"]),
            lifetime_s=float(meta["l"]),
            stale_s=float(meta["x"]),
            with_credentials=bool(meta["c"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None

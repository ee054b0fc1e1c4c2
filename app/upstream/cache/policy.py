"""RFC 9111 for a shared cache: whether an answer may be stored, how long it stays fresh, whether it may be served
stale on error; and what a request's own directives allow.

Kept deliberately narrow where the RFC allows a choice, and said here:
- only 200, 203 and 204 are stored (the answers the gateway passes on as successes);
- ``no-cache`` answers are not stored at all (the gateway does not revalidate), nor are ``no-store``, ``private``,
  ``Vary: *`` or a Vary on a header the gateway sets per request (each request would be its own variant);
- an answer to a request that forwarded Authorization or Cookie is stored only when ``public`` or ``s-maxage``,
  and then under a key without them; it never varies on them;
- ``must-revalidate``, ``proxy-revalidate`` and ``s-maxage`` forbid serving the answer stale.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping
from dataclasses import dataclass

CACHEABLE_STATUSES = frozenset({200, 203, 204})
# A response to a request that forwarded one of these belongs to that client unless the upstream says otherwise.
PRIVATE_REQUEST_HEADERS = frozenset({"authorization", "cookie"})
# Set by the gateway on every call, different each time: a Vary on one makes every request a variant of its own.
PER_REQUEST_HEADERS = frozenset({"x-request-id", "traceparent", "tracestate", "x-request-deadline-ms"})


def header_values(headers: Mapping[str, str], name: str) -> str | None:
    """Every field line of ``name`` joined (a multidict's getall), or the one value of a plain mapping."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = getall(name, None)
        return ", ".join(values) if values else None
    return headers.get(name)


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """Directives by lower-case name; the first of a name given twice wins (a conflict is read the strict way
    by the callers: any no-store or private anywhere still counts)."""
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    for part in value.split(","):
        name, sep, arg = part.partition("=")
        name = name.strip().lower()
        if name:
            directives.setdefault(name, arg.strip().strip('"') if sep else None)
    return directives


# RFC 9111 1.2.2: a delta-seconds too large to hold is taken as 2^31.
MAX_DELTA_SECONDS = 2.0**31


def delta_seconds(value: str | None) -> float | None:
    """A delta-seconds argument; an invalid one is 0 (RFC 9111 1.2.2: treat it as stale)."""
    if value is None:
        return None
    value = value.strip()
    return min(float(value), MAX_DELTA_SECONDS) if value.isascii() and value.isdigit() else 0.0


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


@dataclass(frozen=True, slots=True)
class RequestRules:
    """What the request's own (forwarded) Cache-Control and Pragma allow."""

    lookup: bool = True  # may be answered from the cache
    store: bool = True  # its answer may be stored


DEFAULT_REQUEST_RULES = RequestRules()


def request_rules(cache_control: str | None, pragma: str | None) -> RequestRules:
    if not cache_control and not pragma:
        return DEFAULT_REQUEST_RULES
    directives = parse_cache_control(cache_control)
    if "no-store" in directives:
        return RequestRules(lookup=False, store=False)
    no_cache = "no-cache" in directives or delta_seconds(directives.get("max-age")) == 0.0
    if no_cache or (pragma is not None and "no-cache" in pragma.lower() and not directives):
        return RequestRules(lookup=False, store=True)
    return DEFAULT_REQUEST_RULES


@dataclass(frozen=True, slots=True)
class Freshness:
    lifetime_s: float  # how long after generation the answer is fresh
    age_s: float  # its age when it arrived (the Age header)
    with_credentials: bool  # may answer requests that forwarded Authorization or Cookie
    stale_ok: bool  # may be served stale while the upstream fails


def freshness(
    status: int, headers: Mapping[str, str], *, private_request: bool, default_ttl_s: float, now: float
) -> Freshness | None:
    """How long a response may be served from a shared cache, or None when it must not be stored.

    ``now`` is wall-clock seconds (an Expires date is compared with the response's Date, or with ``now``)."""
    if status not in CACHEABLE_STATUSES:
        return None
    cc = parse_cache_control(header_values(headers, "cache-control"))
    if "no-store" in cc or "private" in cc or "no-cache" in cc:
        return None
    vary = {v.strip().lower() for v in (header_values(headers, "vary") or "").split(",") if v.strip()}
    if "*" in vary or vary & PER_REQUEST_HEADERS:
        return None
    varies_privately = bool(vary & PRIVATE_REQUEST_HEADERS)
    shared_explicitly = "public" in cc or "s-maxage" in cc
    if private_request and (not shared_explicitly or varies_privately):
        return None
    lifetime = delta_seconds(cc.get("s-maxage"))
    if lifetime is None:
        lifetime = delta_seconds(cc.get("max-age"))
    if lifetime is None and "expires" in headers:
        expires = _http_date(headers.get("expires"))
        date = _http_date(headers.get("date"))
        lifetime = 0.0 if expires is None else max(0.0, expires - (date if date is not None else now))
    if lifetime is None:
        lifetime = default_ttl_s
    age = delta_seconds(headers.get("age")) or 0.0
    if lifetime <= age:
        return None
    stale_ok = not ({"must-revalidate", "proxy-revalidate", "s-maxage"} & cc.keys())
    return Freshness(lifetime, age, shared_explicitly and not varies_privately, stale_ok)

"""The key of a cacheable call.

A key is a SHA-256 over the upstream's name and its own configured headers (so two configurations never share an
entry), the method, the URL, the query in a canonical order, and every header forwarded from the client except
Authorization and Cookie. Every forwarded header is keyed, whatever the upstream's Vary says: no header a client
sends can reach the upstream without being part of the key, so no client can make the gateway store an answer
under another client's key. Authorization and Cookie key the single flight (only identical credentials share a
call) and never the store: an answer to a request carrying them is stored only when the upstream marked it
shared (app/upstream/cache/policy.py), and then by nothing private.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from app.upstream.cache.policy import PRIVATE_REQUEST_HEADERS, RequestRules, request_rules

CACHEABLE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class CallKey:
    store: str  # the entry's key: nothing private in it
    flight: str  # the single flight's key: the store key and, when forwarded, the credentials' digest
    private: bool  # the request forwarded Authorization or Cookie
    rules: RequestRules


class KeyMaker:
    def __init__(self, upstream: str, gateway_headers: Mapping[str, str]) -> None:
        salt = hashlib.sha256(upstream.encode())
        for name, value in sorted(gateway_headers.items()):
            salt.update(b"\x00" + name.lower().encode() + b"\x00" + value.encode())
        self._salt = salt

    def key(
        self, method: str, url: object, params: Mapping[str, str], body: Any, headers: Mapping[str, str]
    ) -> CallKey | None:
        """The call's key, or None when it is not cacheable (not GET or HEAD, or it sends a body)."""
        if method not in CACHEABLE_METHODS or body is not None:
            return None
        digest = self._salt.copy()
        # \x00 separates fields: no method, URL (percent-encoded), canonical query or header holds one.
        digest.update(f"\x00{method}\x00{url}\x00".encode())
        if params:
            digest.update(urlencode(sorted(params.items()), quote_via=quote).encode())
        private: list[str] = []
        cache_control = pragma = None
        for name, value in sorted((name.lower(), value) for name, value in headers.items()):
            if name in PRIVATE_REQUEST_HEADERS:
                private.append(f"{name}\x00{value}")
                continue
            if name == "cache-control":
                cache_control = value
            elif name == "pragma":
                pragma = value
            digest.update(f"\x00{name}\x00{value}".encode())
        store = digest.hexdigest()
        flight = store
        if private:
            flight = hashlib.sha256("\x00".join([store, *private]).encode()).hexdigest()
        return CallKey(store, flight, bool(private), request_rules(cache_control, pragma))

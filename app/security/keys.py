"""API keys: configured only as SHA-256 hashes, looked up in constant time, each with its scopes and allowlists.

Why a fast hash and not a password hash (bcrypt, argon2): API keys are random tokens of 32 bytes or more, so
there is nothing to brute-force that a slow hash would protect, and a slow hash on every request would be a
denial-of-service lever. A leaked config file reveals no key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from app.settings import ApiKeyConfig, AuthSettings, KeyRate

SCOPES = ("aggregate", "transform", "metrics")
HASH_PREFIX = "sha256:"
# Longer presented keys are refused before hashing; no real key is anywhere near this.
MAX_KEY_CHARS = 512
MIN_KEY_CHARS = 32


def hash_key(key: str) -> str:
    """The configured form of a key: ``sha256:<64 hex digits>``."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: an API key, or a bearer JWT's subject. An allowlist of None allows everything of
    that kind; an empty one nothing."""

    name: str
    scopes: frozenset[str]
    upstreams: frozenset[str] | None = None
    queries: frozenset[str] | None = None
    composites: frozenset[str] | None = None
    rate: KeyRate | None = None
    subject: str | None = None  # a bearer JWT's `sub`; None for an API key

    @property
    def rate_key(self) -> str:
        """Whose token bucket this request draws on: the key's, or the token subject's (a `:` keeps the two
        apart, as key names cannot hold one)."""
        return self.name if self.subject is None else "jwt:" + self.subject

    @classmethod
    def from_config(cls, key: ApiKeyConfig) -> Principal:
        def allow(names: list[str] | None) -> frozenset[str] | None:
            return None if names is None else frozenset(names)

        return cls(
            name=key.name,
            scopes=frozenset(key.scopes),
            upstreams=allow(key.upstreams),
            queries=allow(key.queries),
            composites=allow(key.composites),
            rate=key.rate,
        )


# The caller when authentication is switched off: every scope, no allowlist, no per-key rate limit.
UNRESTRICTED = Principal(name="", scopes=frozenset(SCOPES))


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        self._entries = [
            (bytes.fromhex(key.hash.removeprefix(HASH_PREFIX)), Principal.from_config(key)) for key in settings.keys
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, presented: str) -> Principal | None:
        """The principal whose key this is, or None.

        The presented key is hashed once and compared with every configured hash, each with compare_digest and
        without stopping at a match, so the time taken tells nothing about which key (if any) matched.
        """
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: Principal | None = None
        for expected, principal in self._entries:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

    Returns None when neither is present; "" (never a valid key) when the two disagree or a header is repeated,
    so that a request can never authenticate as one key and be logged or limited as another.
    """
    found: list[str] = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            found.append(token.strip() if scheme.lower() == "bearer" else "")
        elif name == b"x-api-key":
            found.append(value.decode("latin-1").strip())
    if not found:
        return None
    return found[0] if all(k == found[0] for k in found) else ""

"""Bearer JWTs: verified against the identity provider's keys (app/security/jwks.py), turned into a Principal.

The order of checks puts the cheap ones first, so a forged token costs little: its length, then its header (three
parts, an algorithm of [auth.jwt] algorithms, no ``crit``), then a key of that algorithm and kid, then PyJWT's
signature check with that one key and that one algorithm (the key decides the algorithm, never the header: no
``none``, and never an HMAC with a public key as its secret), then ``exp``, ``nbf``, ``iat``, ``iss``, ``aud``.

Verifying costs 55-95 us of CPU on the loop (RS256 the cheapest, EdDSA the dearest; docs/security.md has the
measurements): far below the blocking detector's threshold, so it runs inline. But cryptography releases the GIL
while it verifies, and with a busy thread in the process getting it back can take milliseconds; and clients send
one token for its whole life. So a verified token is remembered (a bounded LRU keyed by its SHA-256) until its
``exp`` at the latest; a hit costs about 1 us. The cache is emptied whenever the key set changes, so a key the
provider withdrew stops every token it signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, get_args

import jwt
import orjson

from app.errors import (
    BadSignatureError,
    InvalidTokenError,
    MalformedTokenError,
    SigningKeysUnavailableError,
    TokenAlgorithmError,
    TokenAudienceError,
    TokenClaimsError,
    TokenExpiredError,
    TokenIssuerError,
    TokenNotYetValidError,
    UnknownSigningKeyError,
)
from app.security.jwks import JwksKeys, KeySource, SigningKey, StaticKeys
from app.security.keys import Principal
from app.settings import JwtSettings, Scope

GATEWAY_SCOPES = frozenset(get_args(Scope))
# The rate-limit metric's label for every token holder: subjects are unbounded, label values must not be.
JWT_PRINCIPAL = "<jwt>"
MAX_HEADER_CHARS = 2048
MAX_SUBJECT_CHARS = 256
REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]

# PyJWT's errors, most specific first (InvalidSignatureError is a DecodeError, every one an InvalidTokenError).
_MAPPED: tuple[tuple[type[jwt.PyJWTError], Callable[[Exception], InvalidTokenError]], ...] = (
    (jwt.InvalidSignatureError, lambda _: BadSignatureError("the signature does not verify")),
    (jwt.ExpiredSignatureError, lambda _: TokenExpiredError("the token has expired")),
    (jwt.ImmatureSignatureError, lambda _: TokenNotYetValidError("the token is not valid yet (nbf or iat)")),
    (jwt.InvalidAudienceError, lambda _: TokenAudienceError("the token is not meant for this gateway (aud)")),
    (jwt.InvalidIssuerError, lambda _: TokenIssuerError("the token is not from the expected issuer (iss)")),
    (jwt.InvalidAlgorithmError, lambda _: TokenAlgorithmError("the token's algorithm is not accepted")),
    (
        jwt.MissingRequiredClaimError,
        lambda exc: TokenClaimsError(f"the token has no '{getattr(exc, 'claim', '?')}' claim"),
    ),
    (jwt.DecodeError, lambda _: MalformedTokenError("the token cannot be decoded")),
    (jwt.InvalidTokenError, lambda _: TokenClaimsError("a claim of the token has the wrong type")),
)


def looks_like_jwt(credential: str) -> bool:
    """A JWS in compact form: three dot-separated parts (an API key made by `gateway hash-key` has no dot)."""
    return credential.count(".") == 2


class TokenVerifier:
    """A resource (start/aclose) that turns a bearer JWT into a Principal."""

    def __init__(self, settings: JwtSettings, *, on_fetch: Callable[[str], None] | None = None) -> None:
        self._settings = settings
        self._algorithms = frozenset(settings.algorithms)
        self._cache = _TokenCache(settings.token_cache_size)
        self.keys: KeySource
        if settings.jwks_url is not None:
            self.keys = JwksKeys(settings, on_change=self._cache.clear, on_fetch=on_fetch)
        else:
            assert settings.public_key_files is not None
            self.keys = StaticKeys(settings.public_key_files, settings.algorithms)

        def allow(names: list[str] | None) -> frozenset[str] | None:
            return None if names is None else frozenset(names)

        self._grants = {
            "upstreams": allow(settings.upstreams),
            "queries": allow(settings.queries),
            "composites": allow(settings.composites),
        }

    async def start(self) -> None:
        await self.keys.start()

    async def aclose(self) -> None:
        self._cache.clear()
        await self.keys.aclose()

    async def verify(self, token: str) -> Principal:
        """Raises an InvalidTokenError leaf (401) for a token that does not verify, SigningKeysUnavailableError
        (503) while no key set has ever been fetched."""
        if len(token) > self._settings.max_token_bytes:
            raise MalformedTokenError("the token is too long")
        if not looks_like_jwt(token):
            raise MalformedTokenError("the bearer token is not a JWT")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest, time.time())
        if cached is not None:
            return cached
        algorithm, kid = self._header(token)
        keys = self.keys.current
        candidates = keys.candidates(kid, algorithm) if keys is not None else []
        if not candidates:
            keys = await self.keys.refresh_now()  # rate-limited in the key source: at most one fetch per interval
            if keys is None:
                raise SigningKeysUnavailableError("the identity provider's signing keys could not be fetched yet")
            candidates = keys.candidates(kid, algorithm)
            if not candidates:
                raise UnknownSigningKeyError("no signing key of the identity provider matches the token")
        claims = self._decode(token, candidates)
        principal = self._principal(claims)
        self._cache.put(digest, principal, float(claims["exp"]))
        return principal

    def _header(self, token: str) -> tuple[str, str | None]:
        head = token.partition(".")[0]
        if len(head) > MAX_HEADER_CHARS:
            raise MalformedTokenError("the token's header is too long")
        try:
            header = orjson.loads(base64.b64decode(head + "=" * (-len(head) % 4), altchars=b"-_", validate=True))
        except (ValueError, binascii.Error) as exc:  # orjson.JSONDecodeError is a ValueError
            raise MalformedTokenError("the token's header is not base64url JSON") from exc
        if not isinstance(header, dict):
            raise MalformedTokenError("the token's header is not a JSON object")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise TokenAlgorithmError("the token's algorithm is not accepted")
        # Extensions the gateway does not implement (b64=false among them) must be refused, not ignored (RFC 7515).
        if "crit" in header or "b64" in header:
            raise MalformedTokenError("the token uses a critical header extension")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_SUBJECT_CHARS):
            raise MalformedTokenError("the token's kid is not a short string")
        return algorithm, kid

    def _decode(self, token: str, candidates: list[SigningKey]) -> dict[str, Any]:
        s = self._settings
        failed: Exception | None = None
        for candidate in candidates:  # one, unless keys without a kid are in play (PEM files)
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=[candidate.algorithm],
                    audience=s.audience,
                    issuer=s.issuer,
                    leeway=s.leeway_s,
                    options={"require": REQUIRED_CLAIMS},
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                failed = exc
            except jwt.PyJWTError as exc:
                raise _mapped(exc) from exc
        assert failed is not None
        raise _mapped(failed) from failed

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_CHARS:
            raise TokenClaimsError("the token's sub is not a short string")
        claim = self._settings.scopes_claim
        raw = claims.get(claim, [])
        if isinstance(raw, str):
            names = raw.split()
        elif isinstance(raw, list) and all(isinstance(n, str) for n in raw):
            names = raw
        else:
            raise TokenClaimsError(f"the token's {claim} claim is neither a string nor a list of strings")
        # Scope names the gateway does not know (openid, profile, another API's) are the provider's business.
        return Principal(
            name=JWT_PRINCIPAL,
            scopes=GATEWAY_SCOPES.intersection(names),
            rate=self._settings.rate,
            subject=subject,
            **self._grants,
        )


def _mapped(exc: Exception) -> InvalidTokenError:
    for kind, make in _MAPPED:
        if isinstance(exc, kind):
            return make(exc)
    return MalformedTokenError("the token cannot be decoded")


class _TokenCache:
    """Verified tokens by SHA-256, least recently used first, each until its exp."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()

    def get(self, digest: bytes, now: float) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry[0]

    def put(self, digest: bytes, principal: Principal, expires: float) -> None:
        if self._size == 0:
            return
        self._entries[digest] = (principal, expires)
        self._entries.move_to_end(digest)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

"""The guard: one resource holding the key ring, the JWT verifier and the rate limiter, opened by the lifespan.

It answers three questions for every protected request, in this order, before any body is read: who is this
(401), may it use this scope (403), may it do so now (429)."""

from __future__ import annotations

import logging
from typing import Protocol

from app.errors import (
    ForbiddenError,
    InsufficientScopeError,
    InvalidTokenError,
    OverloadedError,
    RateLimitBackendError,
    RateLimitedError,
    StartupError,
    UnauthorizedError,
)
from app.security.jwks import load_pem_keys
from app.security.jwt import TokenVerifier, looks_like_jwt
from app.security.keys import KeyRing, Principal, presented_key
from app.security.ratelimit import LocalRateLimiter, RateLimiter
from app.settings import Settings

log = logging.getLogger(__name__)


class SecurityObserver(Protocol):
    """Metrics hook; called on the event loop, must not block."""

    def auth_failed(self, reason: str) -> None: ...
    def rate_limited(self, key: str) -> None: ...
    def backend_error(self) -> None: ...
    def jwks_fetched(self, outcome: str) -> None: ...


def startup_problems(settings: Settings) -> list[str]:
    """What makes this configuration unsafe to serve (checked by `gateway check-config` and at start-up)."""
    auth = settings.auth
    if auth.enabled and not auth.keys and auth.jwt is None:
        return [
            "auth: authentication is on but no keys are configured: add [[auth.keys]] (or GATEWAY_AUTH__KEYS) "
            "or [auth.jwt], or switch it off explicitly with [auth] enabled = false"
        ]
    if auth.enabled and auth.jwt is not None and auth.jwt.public_key_files is not None:
        try:
            load_pem_keys(auth.jwt.public_key_files, auth.jwt.algorithms)
        except ValueError as exc:
            return [f"auth.jwt.public_key_files: {exc}"]
    return []


def build_rate_limiter(settings: Settings) -> RateLimiter | None:
    rl = settings.rate_limit
    if not rl.enabled or not settings.auth.enabled:
        return None  # limits are per key: without authentication there is no key to count against
    if rl.backend == "redis":
        from app.security.redis_ratelimit import RedisRateLimiter

        return RedisRateLimiter(rl)
    return LocalRateLimiter()


class Guard:
    def __init__(self, settings: Settings, *, observer: SecurityObserver, limiter: RateLimiter | None = None) -> None:
        self._settings = settings
        self._observer = observer
        self.keys = KeyRing(settings.auth)
        jwt = settings.auth.jwt
        self.tokens = (
            TokenVerifier(jwt, on_fetch=observer.jwks_fetched) if jwt is not None and settings.auth.enabled else None
        )
        self.limiter = limiter if limiter is not None else build_rate_limiter(settings)

    async def start(self) -> None:
        """Raises StartupError when authentication is on without a single key or key source."""
        problems = startup_problems(self._settings)
        if problems:
            raise StartupError("; ".join(problems))
        if not self._settings.auth.enabled:
            log.warning(
                "authentication is OFF (auth.enabled = false): every client may call every route",
                extra={"event": "auth_disabled"},
            )
        if self.tokens is not None:
            await self.tokens.start()
        if self.limiter is not None:
            await self.limiter.start()

    async def aclose(self) -> None:
        if self.tokens is not None:
            await self.tokens.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()

    async def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Principal:
        """Raises UnauthorizedError (an InvalidTokenError for a bearer JWT) when no credential, or no valid one,
        was presented; SigningKeysUnavailableError (503) while the identity provider's keys are not yet known."""
        presented = presented_key(headers)
        if presented is None:
            self._observer.auth_failed("missing")
            raise UnauthorizedError(
                "a bearer token or an API key is required"
                if self.tokens is not None
                else "an API key is required: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        # Keys first, whatever their shape: a configured key must never be mistaken for a malformed token.
        principal = self.keys.lookup(presented)
        if principal is not None:
            return principal
        # Not a key: a token, when it looks like one or when no key is configured (then 401 invalid_token either way).
        if self.tokens is None or (len(self.keys) and not looks_like_jwt(presented)):
            self._observer.auth_failed("invalid")
            raise UnauthorizedError("the API key is not valid")
        try:
            return await self.tokens.verify(presented)
        except InvalidTokenError as err:
            self._observer.auth_failed(err.reason)
            raise

    def authorize(self, principal: Principal, scope: str) -> None:
        """Raises ForbiddenError (InsufficientScopeError for a token) when the caller lacks ``scope``."""
        if scope not in principal.scopes:
            self._observer.auth_failed("scope")
            if principal.subject is not None:
                raise InsufficientScopeError(f"this token does not have the '{scope}' scope", scope=scope)
            raise ForbiddenError(f"this key does not have the '{scope}' scope")

    async def admit(self, principal: Principal) -> None:
        """Take a token from the key's bucket. Raises RateLimitedError (429) when it is empty, OverloadedError
        (503) when the shared backend failed and ``failure_mode`` is deny."""
        limiter = self.limiter
        if limiter is None:
            return
        rl = self._settings.rate_limit
        rate, burst = (principal.rate.rate_per_s, principal.rate.burst) if principal.rate else (rl.rate_per_s, rl.burst)
        try:
            decision = await limiter.acquire(principal.rate_key, rate, burst)
        except RateLimitBackendError:
            self._observer.backend_error()
            if rl.failure_mode == "deny":
                raise OverloadedError("the rate limiter is unavailable", retry_after_s=1) from None
            return
        if not decision.allowed:
            self._observer.rate_limited(principal.name)
            raise RateLimitedError(
                f"rate limit of {rate:g}/s (burst {burst}) exceeded for this "
                + ("key" if principal.subject is None else "subject"),
                retry_after_s=decision.retry_after_header,
            )

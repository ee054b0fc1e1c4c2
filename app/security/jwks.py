"""The identity provider's signing keys: a JWKS fetched with aiohttp on the event loop (never a blocking urllib
call), or PEM files read once at start-up.

The JWKS is fetched at start, again every ``refresh_interval_s``, and at once when a token names a key the set does
not hold (the provider rotated), but at most once per ``min_refresh_interval_s`` whatever clients send, so a flood
of made-up ``kid`` values costs the provider one request per interval. Concurrent requests share one fetch. A fetch
that fails (the provider is down, answers an error or garbage) keeps the last good set: tokens signed with known
keys go on verifying.

Only asymmetric verification keys of the configured algorithms are kept: an RSA key of 2048 bits or more (RS256),
an EC P-256 key (ES256), an Ed25519 key (EdDSA). A symmetric (``oct``) key, a private key or an encryption key in
the set is skipped, never used.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWTError

from app.errors import ResourceClosedError
from app.settings import JwtSettings

log = logging.getLogger(__name__)

# A JWKS holds a handful of keys; these bounds keep a broken or hostile provider from costing more than a few ms.
MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 32
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None  # None: a PEM file's key, or a JWK without one; tried for any token kid
    algorithm: str
    key: Any  # a cryptography public key of the algorithm's type


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[SigningKey, ...]

    def candidates(self, kid: str | None, algorithm: str) -> list[SigningKey]:
        """The keys a token with this header may be signed with: its algorithm and, when both have one, its kid."""
        return [k for k in self.keys if k.algorithm == algorithm and (kid is None or k.kid is None or k.kid == kid)]


class KeySource(Protocol):
    """Where a TokenVerifier gets its keys; both kinds are resources with start()/aclose()."""

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...

    @property
    def current(self) -> KeySet | None:
        """The last good key set; None while none has been had."""
        ...

    async def refresh_now(self) -> KeySet | None:
        """After an unknown kid: the key set, fetched again unless that was tried too recently."""
        ...


def _key_algorithm(key: Any) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256" if key.key_size >= MIN_RSA_BITS else None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256" if isinstance(key.curve, ec.SECP256R1) else None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    return None


def parse_jwks(document: bytes, algorithms: Sequence[str]) -> KeySet:
    """The usable keys of a JWKS document. Raises ValueError when it is not a JWKS or holds no usable key."""
    data = orjson.loads(document)
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWKS: no 'keys' list")
    keys: list[SigningKey] = []
    for entry in entries[:MAX_KEYS]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or "d" in entry:
            continue  # an encryption key, or private material the provider should never have published
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            jwk = PyJWK(entry)
        except (PyJWTError, ValueError, TypeError, KeyError):  # an unsupported kty, curve or alg (oct too), or broken
            continue
        algorithm = _key_algorithm(jwk.key)
        # The JWK's own alg must agree with its key's type: an RSA key is never used as anything but RS256.
        if algorithm is None or algorithm != jwk.algorithm_name or algorithm not in algorithms:
            continue
        keys.append(SigningKey(kid, algorithm, jwk.key))
    if not keys:
        raise ValueError(f"no usable signing key among {len(entries)} (wanted {', '.join(algorithms)})")
    return KeySet(tuple(keys))


def load_pem_keys(paths: Iterable[Path], algorithms: Sequence[str]) -> KeySet:
    """Public keys from PEM files. Raises ValueError naming the first file that is unreadable or unusable."""
    keys: list[SigningKey] = []
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a PEM public key") from exc
        algorithm = _key_algorithm(key)
        if algorithm is None:
            raise ValueError(f"{path}: not an RSA key of {MIN_RSA_BITS}+ bits, an EC P-256 key or an Ed25519 key")
        if algorithm not in algorithms:
            raise ValueError(f"{path}: an {algorithm} key, but auth.jwt.algorithms leaves {algorithm} out")
        keys.append(SigningKey(None, algorithm, key))
    return KeySet(tuple(keys))


class StaticKeys:
    """Keys from PEM files: read at start, never refreshed (a new key means a restart)."""

    def __init__(self, paths: Sequence[Path], algorithms: Sequence[str]) -> None:
        self._paths = paths
        self._algorithms = algorithms
        self._keys: KeySet | None = None

    async def start(self) -> None:
        """Raises ValueError when a file is unusable (check-config reports it first)."""
        # A few KB read once before serving: not worth an executor.
        self._keys = load_pem_keys(self._paths, self._algorithms)

    async def aclose(self) -> None:
        return None

    @property
    def current(self) -> KeySet | None:
        return self._keys

    async def refresh_now(self) -> KeySet | None:
        return self._keys


class JwksKeys:
    """The provider's JWKS, kept fresh in a background task; see the module docstring."""

    def __init__(
        self,
        settings: JwtSettings,
        *,
        on_change: Callable[[], None] | None = None,
        on_fetch: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.jwks_url is not None
        self._url = settings.jwks_url
        self._algorithms = tuple(settings.algorithms)
        self._interval_s = settings.refresh_interval_s
        self._min_interval_s = settings.min_refresh_interval_s
        self._timeout_s = settings.fetch_timeout_s
        self._on_change = on_change
        self._on_fetch = on_fetch
        self._clock = clock
        self._keys: KeySet | None = None
        self._document: bytes | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fetching: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._last_attempt = -math.inf
        self._closed = False

    async def start(self) -> None:
        """Fetches the JWKS once. Never raises for the provider: when it is down the gateway starts anyway and
        answers tokens with 503 until a fetch succeeds (API keys keep working)."""
        if self._closed:
            raise ResourceClosedError("the JWKS cache is closed")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(limit=2),
            raise_for_status=False,
        )
        await self._fetch_shared()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="jwks-refresher")

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._refresher, self._fetching) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # returns when they are done, raising nothing of theirs
        if self._session is not None:
            await self._session.close()

    @property
    def current(self) -> KeySet | None:
        return self._keys

    async def refresh_now(self) -> KeySet | None:
        """Raises ResourceClosedError after aclose()."""
        if self._closed:
            raise ResourceClosedError("the JWKS cache is closed")
        if self._fetching is None and self._clock() - self._last_attempt < self._min_interval_s:
            return self._keys  # fetched a moment ago: a kid still unknown is not the provider's
        # Shielded: a request cancelled while it waits must not cancel the fetch that others wait on too.
        await asyncio.shield(self._fetch_shared())
        return self._keys

    def _fetch_shared(self) -> asyncio.Task[bool]:
        if self._fetching is None:
            self._last_attempt = self._clock()
            self._fetching = asyncio.create_task(self._fetch(), name="jwks-fetch")
            self._fetching.add_done_callback(self._fetched)
        return self._fetching

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        if self._fetching is task:
            self._fetching = None

    async def _refresh_forever(self) -> None:
        ok = self._keys is not None
        while True:
            # After a failure, again as soon as the rate limit allows: the set may be stale or missing.
            await asyncio.sleep(self._interval_s if ok else self._min_interval_s)
            ok = await self._fetch_shared()

    async def _fetch(self) -> bool:
        """One GET of the JWKS; True when it gave a usable key set. Never raises but CancelledError."""
        assert self._session is not None
        try:
            # No redirects: one could lead to plain http, or to a host the operator never named.
            async with self._session.get(
                self._url, allow_redirects=False, headers={"Accept": "application/json"}
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP status {resp.status}")
                document = await _read_bounded(resp.content, MAX_JWKS_BYTES)
            # Parsed on the loop: orjson and at most MAX_KEYS keys of about 10 us each.
            keys = parse_jwks(document, self._algorithms)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._report("failed")
            log.warning(
                "fetching the JWKS failed (%s): %s",
                _describe(exc),
                "verifying with the last key set" if self._keys is not None else "no key set yet",
                extra={"event": "jwks_fetch_failed", "stale": self._keys is not None},
            )
            return False
        changed = document != self._document
        self._keys, self._document = keys, document
        self._report("changed" if changed else "unchanged")
        if changed:
            log.info("JWKS loaded: %d keys", len(keys.keys), extra={"event": "jwks_loaded", "keys": len(keys.keys)})
            if self._on_change is not None:
                self._on_change()
        return True

    def _report(self, outcome: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(outcome)


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"the JWKS is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, orjson.JSONDecodeError):
        return "not JSON"
    return str(exc) or type(exc).__name__

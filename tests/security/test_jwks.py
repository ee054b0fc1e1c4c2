"""The JWKS key source on its own, against a real JWKS server: one shared fetch, its rate limit, what is kept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from app.errors import ResourceClosedError
from app.security.jwks import JwksKeys, parse_jwks
from app.settings import JwtSettings
from tests.support.idp import AUDIENCE, ISSUER, IdentityProvider

ALL = ("RS256", "ES256", "EdDSA")


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    async with IdentityProvider() as provider:
        yield provider


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(idp: IdentityProvider, **extra: Any) -> JwtSettings:
    return JwtSettings(jwks_url=idp.jwks_url, issuer=ISSUER, audience=AUDIENCE, **extra)


async def test_concurrent_unknown_kids_share_one_fetch_that_a_cancelled_waiter_does_not_cancel(
    idp: IdentityProvider,
) -> None:
    first = idp.add_key("RS256")
    clock = Clock()
    changes: list[int] = []
    keys = JwksKeys(settings(idp, min_refresh_interval_s=10), clock=clock, on_change=lambda: changes.append(1))
    await keys.start()
    try:
        assert keys.current is not None
        assert [k.kid for k in keys.current.keys] == [first.kid]
        # Within the interval an unknown kid fetches nothing.
        assert await keys.refresh_now() is keys.current
        assert idp.fetches == 1
        second = idp.add_key("ES256")
        clock.now += 10
        idp.gate = asyncio.Event()
        idp.fetched.clear()
        waiters = [asyncio.create_task(keys.refresh_now()) for _ in range(10)]
        await asyncio.wait_for(idp.fetched.wait(), 5)
        waiters[0].cancel()  # a client that went away
        idp.gate.set()
        results = await asyncio.gather(*waiters[1:])
        assert waiters[0].cancelled()
        assert idp.fetches == 2, "ten waiters, one fetch"
        assert all(r is results[0] for r in results)
        assert results[0] is not None
        assert {k.kid for k in results[0].keys} == {first.kid, second.kid}
        assert changes == [1, 1]
        # The same document again is no change: the token cache is kept.
        clock.now += 10
        await keys.refresh_now()
        assert idp.fetches == 3
        assert changes == [1, 1]
    finally:
        await keys.aclose()


@pytest.mark.parametrize(
    "document",
    [b"not json", b'{"keys": "no"}', b"[]", json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode()],
)
async def test_a_broken_jwks_keeps_the_last_good_set(idp: IdentityProvider, document: bytes) -> None:
    idp.add_key("EdDSA")
    clock = Clock()
    keys = JwksKeys(settings(idp), clock=clock)
    await keys.start()
    try:
        good = keys.current
        assert good is not None
        idp.document = document
        clock.now += 60
        assert await keys.refresh_now() is good
        assert idp.fetches == 2
    finally:
        await keys.aclose()


async def test_start_with_the_provider_down_and_close_refuses_use(idp: IdentityProvider) -> None:
    idp.mode = "error"
    keys = JwksKeys(settings(idp))
    await keys.start()
    assert keys.current is None, "no key set yet: the gateway starts anyway"
    await keys.aclose()
    with pytest.raises(ResourceClosedError):
        await keys.refresh_now()


def test_only_asymmetric_public_signing_keys_of_the_configured_algorithms_are_kept() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    p256 = ec.generate_private_key(ec.SECP256R1())
    good_rsa = {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "rsa"}
    entries = [
        good_rsa,
        {**RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True), "kid": "weak"},
        {**ECAlgorithm.to_jwk(p384.public_key(), as_dict=True), "kid": "p384"},
        {**ECAlgorithm.to_jwk(p256.public_key(), as_dict=True), "kid": "p256"},
        {**ECAlgorithm.to_jwk(p256.public_key(), as_dict=True), "kid": "enc", "use": "enc"},
        {**RSAAlgorithm.to_jwk(rsa_key, as_dict=True), "kid": "private"},  # private parts published by mistake
        {**good_rsa, "kid": "rs-as-es", "alg": "ES256"},  # an alg its key type cannot have
        {**good_rsa, "kid": "ps", "alg": "PS256"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not an object",
    ]
    document = json.dumps({"keys": entries}).encode()
    assert [(k.kid, k.algorithm) for k in parse_jwks(document, ALL).keys] == [("rsa", "RS256"), ("p256", "ES256")]
    assert [k.kid for k in parse_jwks(document, ["ES256"]).keys] == ["p256"]
    with pytest.raises(ValueError, match="no usable signing key"):
        parse_jwks(document, ["EdDSA"])

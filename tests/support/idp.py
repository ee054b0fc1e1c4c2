"""A real identity provider for tests: signing keys made here with `cryptography`, their JWKS served by an aiohttp
server on a free loopback port (in the test's own loop, as the in-process gateway is), tokens signed with PyJWT.

    async with IdentityProvider() as idp:
        key = idp.add_key("RS256")
        token = idp.mint(key, scope="aggregate")
        idp.mode = "error"          # the JWKS answers 503; "down" stops the server outright
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.test/"
AUDIENCE = "gateway"
JWKS_PATH = "/.well-known/jwks.json"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class IdpKey:
    kid: str
    algorithm: str
    private: PrivateKey

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


class IdentityProvider:
    def __init__(self) -> None:
        self.published: list[IdpKey] = []
        self.mode: Literal["ok", "error"] = "ok"
        self.fetches = 0
        self.fetched = asyncio.Event()  # set on every fetch; a test clears it before waiting for the next
        self.gate: asyncio.Event | None = None  # when set to an Event, every answer waits for it
        self.document: bytes | None = None  # served instead of the published keys' JWKS
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._serial = 0

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    def add_key(self, algorithm: str = "RS256", *, publish: bool = True) -> IdpKey:
        self._serial += 1
        key = IdpKey(f"{algorithm.lower()}-{self._serial}", algorithm, new_private_key(algorithm))
        if publish:
            self.published.append(key)
        return key

    def mint(self, key: IdpKey, *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token signed by ``key``: sub, iss, aud, iat, exp (5 min) by default, each overridable (None drops)."""
        now = int(time.time())
        body: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key.private, algorithm=key.algorithm, headers={"kid": key.kid, **(headers or {})})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.fetched.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "error":
            return web.Response(status=503, text="maintenance")
        document = self.document or json.dumps({"keys": [k.jwk() for k in self.published]}).encode()
        return web.Response(body=document, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """The provider goes away altogether: its port refuses connections until start() again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> IdentityProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

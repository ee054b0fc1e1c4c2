"""Bearer JWTs end to end: a real JWKS server on loopback, tokens signed here with each algorithm and forged in
every way the issue lists, the gateway run through its real lifespan."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from app.errors import ConfigError
from app.security.keys import hash_key
from app.settings import Settings, load_settings
from tests.aggregate.conftest import upstream_cfg
from tests.security.conftest import Key, metric, new_key
from tests.support.gateway import RunningGateway, gateway_process, make_settings, running_gateway
from tests.support.idp import AUDIENCE, ISSUER, IdentityProvider, IdpKey
from tests.support.upstream import UpstreamServer

ALGORITHMS = ("RS256", "ES256", "EdDSA")


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    async with IdentityProvider() as provider:
        yield provider


def jwt_settings(idp: IdentityProvider, *keys: Key, jwt: dict[str, Any] | None = None, **sections: Any) -> Settings:
    section = {"jwks_url": idp.jwks_url, "issuer": ISSUER, "audience": AUDIENCE, **(jwt or {})}
    return make_settings(auth={"enabled": True, "keys": [k.config for k in keys], "jwt": section}, **sections)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "scope": "metrics"} | (
        overrides
    )


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"


def failures(gw: RunningGateway, reason: str) -> float:
    return metric(generate_latest(gw.state.metrics.registry).decode(), "gateway_auth_failures_total", reason=reason)


async def get_metrics(client: aiohttp.ClientSession, gw: RunningGateway, token: str) -> tuple[int, dict[str, str]]:
    async with client.get(f"{gw.url}/metrics", headers=bearer(token)) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_tokens_of_each_algorithm_verify_with_no_api_key_configured(idp: IdentityProvider) -> None:
    keys = {alg: idp.add_key(alg) for alg in ALGORITHMS}
    async with running_gateway(jwt_settings(idp)) as gw, aiohttp.ClientSession() as client:
        for alg, key in keys.items():
            status, _ = await get_metrics(client, gw, idp.mint(key, scope="openid metrics"))
            assert status == 200, alg
            # The scopes claim as a list (Okta's scp) works as well as a space-separated string.
            status, _ = await get_metrics(client, gw, idp.mint(key, scope=["metrics"]))
            assert status == 200, alg
        async with client.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"', "no credentials: a bare challenge"
    assert idp.fetches == 1, "one fetch at start served every key"


async def test_a_custom_scopes_claim_and_a_missing_scope(idp: IdentityProvider) -> None:
    key = idp.add_key("ES256")
    settings = jwt_settings(idp, jwt={"scopes_claim": "scp"})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await get_metrics(client, gw, idp.mint(key, scp="metrics")))[0] == 200
        for token in (idp.mint(key, scope="metrics"), idp.mint(key, scp="aggregate transform"), idp.mint(key)):
            async with client.get(f"{gw.url}/metrics", headers=bearer(token)) as resp:
                assert resp.status == 403
                assert resp.headers["WWW-Authenticate"] == (
                    'Bearer realm="gateway", error="insufficient_scope", scope="metrics"'
                )
                body = await resp.json(content_type=None)
                assert body["type"] == "urn:gateway:problem:insufficient-scope"
        assert failures(gw, "scope") == 3


async def test_forged_and_invalid_tokens_are_401_invalid_token(idp: IdentityProvider) -> None:
    key = idp.add_key("RS256")
    stranger = idp.add_key("RS256", publish=False)
    public_pem = key.public_pem()
    now = int(time.time())
    hs256_header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    hs256_input = unsigned(hs256_header, claims()).rsplit(".", 1)[0]
    forged_hs256 = hs256_input + "." + b64(hmac.new(public_pem, hs256_input.encode(), hashlib.sha256).digest())
    valid = idp.mint(key, scope="metrics")
    head, body, signature = valid.split(".")
    altered = signature[:10] + ("B" if signature[10] != "B" else "C") + signature[11:]
    cases: dict[str, tuple[str, str]] = {
        "alg none": (unsigned({"alg": "none", "typ": "JWT"}, claims()), "token_algorithm"),
        "alg None with the key's kid": (unsigned({"alg": "None", "kid": key.kid}, claims()), "token_algorithm"),
        "HS256 signed with the public key": (forged_hs256, "token_algorithm"),
        "RS384 (not configured)": (unsigned({"alg": "RS384", "kid": key.kid}, claims(), b"x" * 256), "token_algorithm"),
        "expired": (idp.mint(key, exp=now - 120, scope="metrics"), "token_expired"),
        "wrong aud": (idp.mint(key, aud="another-api", scope="metrics"), "token_audience"),
        "wrong iss": (idp.mint(key, iss="https://evil.test/", scope="metrics"), "token_issuer"),
        "nbf in the future": (idp.mint(key, nbf=now + 600, scope="metrics"), "token_not_yet_valid"),
        "iat in the future": (idp.mint(key, iat=now + 600, scope="metrics"), "token_not_yet_valid"),
        "no exp": (idp.mint(key, exp=None, scope="metrics"), "token_claims"),
        "no sub": (idp.mint(key, sub=None, scope="metrics"), "token_claims"),
        "scope claim a number": (idp.mint(key, scope=7), "token_claims"),
        "signed by a stranger with the known kid": (
            idp.mint(stranger, headers={"kid": key.kid}, scope="metrics"),
            "token_signature",
        ),
        "claims changed after signing": (
            f"{head}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}",
            "token_signature",
        ),
        "signature altered": (f"{head}.{body}.{altered}", "token_signature"),
        "signature not base64": (f"{head}.{body}.!!!!", "token_malformed"),
        "header not base64": (f"!!!.{body}.{signature}", "token_malformed"),
        "header not an object": (f"{b64(b'[1]')}.{body}.{signature}", "token_malformed"),
        "critical extension": (
            unsigned({"alg": "RS256", "kid": key.kid, "crit": ["exp"]}, claims()),
            "token_malformed",
        ),
        "huge": (f"{head}.{'A' * 9000}.{signature}", "token_malformed"),
        "unknown kid": (idp.mint(stranger, scope="metrics"), "token_unknown_key"),
    }
    settings = jwt_settings(idp, jwt={"min_refresh_interval_s": 60})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for name, (token, reason) in cases.items():
            before = failures(gw, reason)
            async with client.get(f"{gw.url}/metrics", headers=bearer(token)) as resp:
                assert resp.status == 401, name
                challenge = resp.headers["WWW-Authenticate"]
                assert challenge.startswith('Bearer realm="gateway", error="invalid_token", error_description="'), name
                problem = await resp.json(content_type=None)
                assert problem["type"] == "urn:gateway:problem:invalid-token", name
                assert problem["status"] == 401
            assert failures(gw, reason) == before + 1, name
        assert (await get_metrics(client, gw, valid))[0] == 200, "the genuine token still works"
    assert idp.fetches == 1, "within min_refresh_interval_s an unknown kid fetches nothing"


async def test_api_keys_and_tokens_side_by_side(idp: IdentityProvider, upstream: UpstreamServer) -> None:
    # A key whose shape is a JWT's (two dots) is still a key: keys are looked up first.
    secret = "a.b.c-" + "k" * 40
    dotted = Key("dotted", secret, {"name": "dotted", "hash": hash_key(secret), "scopes": ["metrics"]})
    agg_key = new_key("agg", ["aggregate"])
    key = idp.add_key("EdDSA")
    settings = jwt_settings(
        idp,
        agg_key,
        dotted,
        jwt={"upstreams": ["users"]},
        upstreams={"users": upstream_cfg(upstream.url), "inventory": upstream_cfg(upstream.url)},
    )
    one = {"sources": {"u": {"upstream": "users", "path": "/users/1"}}}
    other = {"sources": {"i": {"upstream": "inventory", "path": "/items"}}}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        token = idp.mint(key, scope="aggregate")
        for headers, payload, expected in (
            (agg_key.bearer, other, 200),
            (agg_key.header, one, 200),
            (bearer(token), one, 200),
            (bearer(token), other, 403),  # outside [auth.jwt] upstreams
            ({"Authorization": "Bearer not-a-key-and-not-a-jwt"}, one, 401),
        ):
            async with client.post(f"{gw.url}/aggregate", json=payload, headers=headers) as resp:
                assert resp.status == expected, (headers, payload, await resp.text())
        assert (await get_metrics(client, gw, dotted.secret))[0] == 200
        assert failures(gw, "invalid") == 1


async def test_rotation_mid_test_refreshes_once_and_drops_withdrawn_keys(idp: IdentityProvider) -> None:
    old = idp.add_key("RS256")
    settings = jwt_settings(idp, jwt={"min_refresh_interval_s": 1})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        old_token = idp.mint(old, scope="metrics")
        assert (await get_metrics(client, gw, old_token))[0] == 200  # verified, and now cached
        # The provider rotates: the new key replaces the old one.
        new = idp.add_key("ES256", publish=False)
        idp.published = [new]
        new_token = idp.mint(new, scope="metrics")
        # Tokens with unknown kids in a burst: within a second of the start-up fetch, none may fetch again...
        await asyncio.gather(*(get_metrics(client, gw, idp.mint(new, scope="metrics", jti=str(i))) for i in range(20)))
        assert idp.fetches <= 2
        # ...and once the interval has passed, the next unknown kid fetches (once) and is accepted.
        deadline = time.monotonic() + 10
        while (status := (await get_metrics(client, gw, new_token))[0]) != 200:
            assert status == 401, status
            assert time.monotonic() < deadline, "the rotated key was never fetched"
            await asyncio.sleep(0.05)
        assert idp.fetches == 2, "one refresh for a burst of unknown kids"
        # The withdrawn key's token is refused at once, cached or not.
        status, headers = await get_metrics(client, gw, old_token)
        assert status == 401
        assert "invalid_token" in headers["WWW-Authenticate"]
        text = generate_latest(gw.state.metrics.registry).decode()
        assert metric(text, "gateway_jwks_fetches_total", outcome="changed") == 2


async def test_provider_down_keeps_the_last_key_set(idp: IdentityProvider) -> None:
    key = idp.add_key("ES256")
    settings = jwt_settings(idp, jwt={"min_refresh_interval_s": 1, "token_cache_size": 0})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await get_metrics(client, gw, idp.mint(key, scope="metrics")))[0] == 200
        await idp.stop()  # connection refused from now on
        stranger = idp.add_key("ES256", publish=False)
        registry = gw.state.metrics.registry
        deadline = time.monotonic() + 10
        # An unknown kid makes the gateway try the provider (once the interval has passed): the fetch fails.
        while metric(generate_latest(registry).decode(), "gateway_jwks_fetches_total", outcome="failed") < 1:
            assert (await get_metrics(client, gw, idp.mint(stranger, scope="metrics")))[0] == 401
            assert time.monotonic() < deadline, "no fetch was tried"
            await asyncio.sleep(0.05)
        # Fresh tokens (no cache) signed with the known key still verify against the stale set.
        for sub in ("alice", "bob", "carol"):
            assert (await get_metrics(client, gw, idp.mint(key, sub=sub, scope="metrics")))[0] == 200


async def test_provider_down_at_start_is_503_then_recovers(idp: IdentityProvider) -> None:
    key = idp.add_key("RS256")
    api_key = new_key("scraper", ["metrics"])
    idp.mode = "error"
    settings = jwt_settings(idp, api_key, jwt={"min_refresh_interval_s": 1})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/metrics", headers=bearer(idp.mint(key, scope="metrics"))) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            assert (await resp.json(content_type=None))["type"] == "urn:gateway:problem:signing-keys-unavailable"
        async with client.get(f"{gw.url}/metrics", headers=api_key.bearer) as resp:
            assert resp.status == 200, "API keys do not depend on the provider"
        idp.mode = "ok"
        deadline = time.monotonic() + 10
        while (await get_metrics(client, gw, idp.mint(key, scope="metrics")))[0] != 200:
            assert time.monotonic() < deadline, "the gateway never fetched the keys once the provider was back"
            await asyncio.sleep(0.05)


async def test_the_rate_limit_is_per_subject(idp: IdentityProvider) -> None:
    key = idp.add_key("RS256")
    settings = jwt_settings(idp, rate_limit={"rate_per_s": 0.01, "burst": 2})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        alice = [(await get_metrics(client, gw, idp.mint(key, sub="alice", scope="metrics", jti=str(i))))[0]
                 for i in range(3)]  # fmt: skip
        assert alice == [200, 200, 429], "three different tokens of one subject share one bucket"
        assert (await get_metrics(client, gw, idp.mint(key, sub="bob", scope="metrics")))[0] == 200
        text = generate_latest(gw.state.metrics.registry).decode()
        assert metric(text, "gateway_rate_limited_total", key="<jwt>") == 1, "subjects never become label values"


async def test_public_key_files_instead_of_a_jwks(idp: IdentityProvider, tmp_path: Path) -> None:
    keys = [idp.add_key(alg, publish=False) for alg in ALGORITHMS]
    files = []
    for key in keys:
        path = tmp_path / f"{key.kid}.pem"
        path.write_bytes(key.public_pem())
        files.append(str(path))
    settings = make_settings(
        auth={"enabled": True, "jwt": {"public_key_files": files, "issuer": ISSUER, "audience": AUDIENCE}}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for key in keys:
            # A PEM key has no kid: the token's kid names nothing, and the key of its algorithm verifies it.
            assert (await get_metrics(client, gw, idp.mint(key, scope="metrics")))[0] == 200
        stranger = idp.add_key("RS256", publish=False)
        assert (await get_metrics(client, gw, idp.mint(stranger, scope="metrics")))[0] == 401
    assert idp.fetches == 0


def _config(tmp_path: Path, jwt: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[auth.jwt]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n{jwt}\n')
    return path


@pytest.mark.parametrize(
    ("jwt", "message"),
    [
        ('jwks_url = "http://idp.example.com/jwks.json"', "must be https://"),
        ('jwks_url = "ftp://idp.example.com/jwks.json"', "absolute https://"),
        ('jwks_url = "https://idp.example.com/jwks.json"\nalgorithms = ["HS256"]', "not HS256"),
        ('jwks_url = "https://idp.example.com/jwks.json"\nalgorithms = ["RS256", "none"]', "not none"),
        ('jwks_url = "https://idp.example.com/jwks.json"\npublic_key_files = ["{tmp}/x.pem"]', "exactly one of"),
        ("", "exactly one of"),
        ('public_key_files = ["/nonexistent/idp.pem"]', "no such file"),
        ('jwks_url = "https://idp.example.com/jwks.json"\nupstreams = ["nowhere"]', "unknown upstreams: nowhere"),
    ],
)
def test_settings_refuse_unsafe_jwt_config(tmp_path: Path, jwt: str, message: str) -> None:
    (tmp_path / "x.pem").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, jwt.replace("{tmp}", str(tmp_path))), environ=False)
    assert any(message in p for p in info.value.problems), info.value.problems


def test_settings_accept_https_and_loopback_http(tmp_path: Path) -> None:
    for url in (
        "https://idp.example.com/jwks.json",
        "http://127.0.0.1:8999/jwks",
        "http://[::1]/j",
        "http://localhost/j",
    ):
        settings = load_settings(_config(tmp_path, f'jwks_url = "{url}"'), environ=False)
        assert settings.auth.jwt is not None
        assert settings.auth.jwt.algorithms == list(ALGORITHMS)


def test_check_config_loads_the_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main
    from tests.support.idp import new_private_key

    good = tmp_path / "good.pem"
    good.write_bytes(IdpKey("k", "ES256", new_private_key("ES256")).public_pem())
    not_a_key = tmp_path / "cert.pem"
    not_a_key.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(SystemExit) as ok:
        main(["check-config", str(_config(tmp_path, f'public_key_files = ["{good}"]'))])
    assert ok.value.code == 0, "JWT alone is enough: no API key needed"
    with pytest.raises(SystemExit) as bad:
        main(["check-config", str(_config(tmp_path, f'public_key_files = ["{good}", "{not_a_key}"]'))])
    assert bad.value.code == 2
    assert "not a PEM public key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as excluded:
        main(["check-config", str(_config(tmp_path, f'public_key_files = ["{good}"]\nalgorithms = ["RS256"]'))])
    assert excluded.value.code == 2
    assert "leaves ES256 out" in capsys.readouterr().err


@pytest.mark.slow
async def test_verification_does_not_block_the_loop_under_load(idp: IdentityProvider, tmp_path: Path) -> None:
    """A real `gateway serve` (uvloop, its blocking detector at the default 100 ms) verifying every request's token
    afresh (no cache), with a closed-loop load of all three algorithms."""
    keys = [idp.add_key(alg, publish=False) for alg in ALGORITHMS]
    for key in keys:
        (tmp_path / f"{key.kid}.pem").write_bytes(key.public_pem())
    scraper = new_key("scraper", ["metrics"])
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[compute]\nenabled = false\n[rate_limit]\nenabled = false\n[observability]\naccess_log = false\n"
        f'[[auth.keys]]\nname = "scraper"\nhash = "{scraper.config["hash"]}"\nscopes = ["metrics"]\n'
        f"[auth.jwt]\npublic_key_files = {json.dumps([str(tmp_path / f'{k.kid}.pem') for k in keys])}\n"
        f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\ntoken_cache_size = 0\n'
    )
    tokens = [bearer(idp.mint(keys[i % 3], sub=f"user{i}", scope="metrics")) for i in range(30)]
    statuses: dict[int, int] = {}
    with gateway_process(config, tmp_path, auth=True) as gw:
        async with aiohttp.ClientSession() as client:

            async def blocked() -> float:
                async with client.get(f"{gw.url}/metrics", headers=scraper.bearer) as resp:
                    return metric(await resp.text(), "gateway_event_loop_blocked_total")

            before = await blocked()

            async def worker(offset: int) -> None:
                for i in range(100):
                    # An unrouted path: the request is authenticated (the token verified), then answered 404.
                    async with client.get(f"{gw.url}/nothing", headers=tokens[(offset + i) % len(tokens)]) as resp:
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1

            async with asyncio.TaskGroup() as tg:
                for offset in range(16):
                    tg.create_task(worker(offset))
            after = await blocked()
    assert statuses == {404: 1600}, "every token verified"
    assert after == before, "the loop stalled past 100 ms while verifying tokens"


async def test_a_cached_token_expires_at_its_exp(idp: IdentityProvider, tmp_path: Path) -> None:
    from app.errors import TokenExpiredError
    from app.security.jwt import TokenVerifier
    from app.settings import JwtSettings

    key = idp.add_key("EdDSA", publish=False)
    (tmp_path / "idp.pem").write_bytes(key.public_pem())
    settings = JwtSettings(public_key_files=[tmp_path / "idp.pem"], issuer=ISSUER, audience=AUDIENCE, leeway_s=0)
    verifier = TokenVerifier(settings)
    await verifier.start()
    try:
        token = idp.mint(key, exp=int(time.time()) + 1, scope="metrics")
        first = await verifier.verify(token)
        assert first.subject == "alice"
        assert first.rate_key == "jwt:alice"
        assert await verifier.verify(token) is first, "the second time from the cache"
        deadline = time.monotonic() + 5
        while True:
            try:
                await verifier.verify(token)
            except TokenExpiredError:
                break
            assert time.monotonic() < deadline, "the cache outlived the token"
            await asyncio.sleep(0.05)
    finally:
        await verifier.aclose()

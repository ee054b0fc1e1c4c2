"""The gateway's own credentials for an upstream: headers it sends on every call, and TLS (a private CA, mutual
TLS), against real HTTPS servers on loopback with certificates made for the test."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from app.errors import ConfigError, StartupError
from app.main import create_app
from app.settings import load_settings
from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

TOKEN = "Bearer s3cr3t-for-the-users-service"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CA's certificate, and a client certificate it issued, as the files an operator would mount."""
    folder = tmp_path_factory.mktemp("pem")
    client = ca.issue_cert("gateway.internal")
    files = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(files["cert"]), append=True)
    return files


def tls_server(ca: trustme.CA, *, client_certs: bool) -> UpstreamServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if client_certs:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return UpstreamServer("tls", ssl_context=context)


@pytest.fixture
def https_upstream(ca: trustme.CA) -> Iterator[UpstreamServer]:
    with tls_server(ca, client_certs=False) as server:
        server.set("/me", Behavior(json={"who": "me"}))
        yield server


@pytest.fixture
def mtls_upstream(ca: trustme.CA) -> Iterator[UpstreamServer]:
    with tls_server(ca, client_certs=True) as server:
        server.set("/me", Behavior(json={"who": "me"}))
        yield server


async def fetch(settings: Any, path: str = "/me", **spec: Any) -> dict[str, Any]:
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "u", "path": path, **spec}})
    assert status == 200, body
    result: dict[str, Any] = body["results"]["s"]
    return result


async def test_configured_headers_reach_the_upstream_on_every_attempt(upstream: UpstreamServer) -> None:
    upstream.set("/flaky", Behavior(json={"ok": True}, statuses=[503]))
    cfg = upstream_cfg(upstream.url, headers={"Authorization": TOKEN, "X-Api-Key": "k-123"})
    result = await fetch(make_settings(upstreams={"u": cfg}), "/flaky")
    assert (result["ok"], result["attempts"]) == (True, 2)
    assert [r.headers["authorization"] for r in upstream.requests] == [TOKEN, TOKEN]
    assert {r.headers["x-api-key"] for r in upstream.requests} == {"k-123"}


async def test_a_client_cannot_send_or_replace_the_gateways_credentials(upstream: UpstreamServer) -> None:
    upstream.set("/me", Behavior(json={}))
    cfg = upstream_cfg(upstream.url, headers={"Authorization": TOKEN}, forward_headers=["accept-language"])
    settings = make_settings(upstreams={"u": cfg})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        spec = {"upstream": "u", "path": "/me", "headers": {"Authorization": "Bearer mine"}}
        status, body, _ = await post_aggregate(client, gw.url, {"s": spec})
        assert status == 422
        assert body["errors"][0]["type"] == "header_not_allowed"
        assert upstream.count() == 0
        # An allowlisted header of the client's goes along with the gateway's own.
        spec = {"upstream": "u", "path": "/me", "headers": {"Accept-Language": "de"}}
        status, body, _ = await post_aggregate(client, gw.url, {"s": spec})
    assert status == 200, body
    (request,) = upstream.requests
    assert (request.headers["accept-language"], request.headers["authorization"]) == ("de", TOKEN)
    with pytest.raises(ValueError, match="both set by the gateway and forwarded"):
        make_settings(upstreams={"u": {**cfg, "forward_headers": ["authorization"]}})


def test_credentials_never_show(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[auth]\nenabled = false\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                    f'headers = {{ Authorization = "{TOKEN}" }}\n')  # fmt: skip
    settings = load_settings(path, environ=False)
    assert TOKEN not in repr(settings)
    assert TOKEN not in settings.model_dump_json()


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Host": "elsewhere"}, "the gateway sets Host itself"),
        ({"X-Request-Deadline-Ms": "1"}, "the gateway sets X-Request-Deadline-Ms itself"),
        ({"Bad Name": "x"}, "is not a valid header name"),
        ({"X-Token": "a\r\nInjected: yes"}, "holds a control character"),
        ({"X-Token": "from-a-file\n"}, "holds a control character (a trailing newline?)"),
        ({"Content-Type": "text/plain"}, "the gateway sets Content-Type itself"),
        ({"X-Token": "a", "x-token": "b"}, "x-token is given twice"),
    ],
)
def test_bad_headers_are_refused_by_key_path(tmp_path: Path, headers: dict[str, str], problem: str) -> None:
    path = tmp_path / "gateway.toml"
    inline = ", ".join(f'"{k}" = "{v}"'.replace("\r", "\\r").replace("\n", "\\n") for k, v in headers.items())
    path.write_text(
        f'[auth]\nenabled = false\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\nheaders = {{ {inline} }}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=False)
    assert any(p.startswith("upstreams.u.headers") and problem in p for p in info.value.problems), info.value.problems


async def test_an_upstream_signed_by_a_private_ca(https_upstream: UpstreamServer, pem: dict[str, Path]) -> None:
    trusted = upstream_cfg(https_upstream.url, tls={"ca_file": str(pem["ca"])})
    assert (await fetch(make_settings(upstreams={"u": trusted})))["data"] == {"who": "me"}
    # Without the CA the certificate is not trusted: the source fails, saying why but naming no address.
    untrusted = upstream_cfg(https_upstream.url, retry={"attempts": 1})
    result = await fetch(make_settings(upstreams={"u": untrusted}))
    assert result["error"] == {"type": "connect", "message": "u: TLS handshake failed"}


async def test_mutual_tls(mtls_upstream: UpstreamServer, pem: dict[str, Path]) -> None:
    both = {"ca_file": str(pem["ca"]), "client_cert_file": str(pem["cert"]), "client_key_file": str(pem["key"])}
    cfg = upstream_cfg(mtls_upstream.url, tls=both)
    assert (await fetch(make_settings(upstreams={"u": cfg})))["ok"] is True
    no_cert = upstream_cfg(mtls_upstream.url, tls={"ca_file": str(pem["ca"])}, retry={"attempts": 1})
    result = await fetch(make_settings(upstreams={"u": no_cert}))
    assert result["ok"] is False
    assert result["error"]["type"] == "connect"
    assert mtls_upstream.count() == 1, "only the call with the client certificate got through"


def test_tls_settings_are_checked(tmp_path: Path, pem: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="need an https:// base_url"):
        make_settings(upstreams={"u": {"base_url": "http://127.0.0.1:9", "tls": {"ca_file": str(pem["ca"])}}})
    with pytest.raises(ValueError, match="go together"):
        make_settings(
            upstreams={"u": {"base_url": "https://127.0.0.1:9", "tls": {"client_cert_file": str(pem["cert"])}}}
        )
    with pytest.raises(ValueError, match="no such file"):
        make_settings(upstreams={"u": {"base_url": "https://127.0.0.1:9", "tls": {"ca_file": str(tmp_path / "x")}}})


async def test_unusable_tls_files_stop_the_start_naming_the_upstream(tmp_path: Path, pem: dict[str, Path]) -> None:
    garbage = tmp_path / "not-a-key.pem"
    garbage.write_text("not a key")
    tls = {"client_cert_file": str(pem["cert"]), "client_key_file": str(garbage)}
    settings = make_settings(upstreams={"u": {"base_url": "https://127.0.0.1:9", "tls": tls}})
    app = create_app(settings)
    with pytest.raises(StartupError, match="upstream u: its TLS files cannot be used"):
        async with app.router.lifespan_context(app):
            pytest.fail("the lifespan must not start")
    assert app.state.gateway.http._session.closed, "what was opened before is closed again"


async def test_an_encrypted_client_key_needs_its_password(
    mtls_upstream: UpstreamServer, pem: dict[str, Path], tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(pem["key"].read_bytes(), password=None)
    encrypted = tmp_path / "client-encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"open sesame"),
        )
    )
    tls = {"ca_file": str(pem["ca"]), "client_cert_file": str(pem["cert"]), "client_key_file": str(encrypted)}
    with_password = upstream_cfg(mtls_upstream.url, tls={**tls, "client_key_password": "open sesame"})
    assert (await fetch(make_settings(upstreams={"u": with_password})))["ok"] is True
    # Without it the start fails at once, naming the upstream (and never waits on a passphrase prompt).
    app = create_app(make_settings(upstreams={"u": upstream_cfg(mtls_upstream.url, tls=tls)}))
    with pytest.raises(StartupError, match="upstream u: its TLS files cannot be used"):
        async with app.router.lifespan_context(app):
            pytest.fail("the lifespan must not start")


def test_check_config_loads_the_tls_files(tmp_path: Path, pem: dict[str, Path]) -> None:
    garbage = tmp_path / "not-a-key.pem"
    garbage.write_text("not a key")

    def check(key: Path) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "gateway.toml"
        path.write_text(
            '[auth]\nenabled = false\n[upstreams.u]\nbase_url = "https://127.0.0.1:9"\n'
            f'tls = {{ client_cert_file = "{pem["cert"]}", client_key_file = "{key}" }}\n'
        )
        cmd = [sys.executable, "-m", "app", "check-config", str(path)]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    assert check(pem["key"]).returncode == 0
    bad = check(garbage)
    assert bad.returncode == 2
    assert "upstreams.u.tls: upstream u: its TLS files cannot be used" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_environment_overrides_a_credential_whatever_the_files_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[auth]\nenabled = false\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                    'headers = { Authorization = "Bearer from-the-file" }\n')  # fmt: skip
    monkeypatch.setenv("GATEWAY_UPSTREAMS__U__HEADERS__AUTHORIZATION", "Bearer rotated")
    headers = load_settings(path).upstreams["u"].headers
    assert {name: value.get_secret_value() for name, value in headers.items()} == {"authorization": "Bearer rotated"}


def test_a_key_password_needs_a_key(pem: dict[str, Path]) -> None:
    tls = {"ca_file": str(pem["ca"]), "client_key_password": "x"}
    with pytest.raises(ValueError, match="client_key_password needs client_key_file"):
        make_settings(upstreams={"u": {"base_url": "https://127.0.0.1:9", "tls": tls}})

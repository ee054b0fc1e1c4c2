"""Keys: hashing, lookup, how a key is presented, the hash-key command, keys from the environment."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.security.keys import KeyRing, hash_key, presented_key
from app.settings import AuthSettings
from tests.security.conftest import new_key
from tests.support.gateway import gateway_process

TOKENS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=32, max_size=80)


def ring(*secrets_and_names: tuple[str, str]) -> KeyRing:
    return KeyRing(
        AuthSettings(keys=[{"name": n, "hash": hash_key(s), "scopes": ["aggregate"]} for s, n in secrets_and_names])
    )


@given(a=TOKENS, b=TOKENS, probe=TOKENS)
def test_a_key_finds_its_own_entry_and_nothing_else_does(a: str, b: str, probe: str) -> None:
    keys = ring((a, "a"), (b, "b")) if a != b else ring((a, "a"))
    found = keys.lookup(a)
    assert found is not None
    assert found.name == "a"
    if probe not in (a, b):
        assert keys.lookup(probe) is None


def test_lookup_refuses_empty_and_huge_keys() -> None:
    keys = ring(("k" * 40, "k"))
    assert keys.lookup("") is None
    assert keys.lookup("k" * 10_000) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"authorization", b"Bearer abc")], "abc"),
        ([(b"authorization", b"bearer   abc  ")], "abc"),
        ([(b"x-api-key", b" abc ")], "abc"),
        ([(b"authorization", b"Bearer abc"), (b"x-api-key", b"abc")], "abc"),
        ([(b"authorization", b"Bearer abc"), (b"x-api-key", b"xyz")], ""),
        ([(b"x-api-key", b"abc"), (b"x-api-key", b"xyz")], ""),
        ([(b"authorization", b"Basic abc")], ""),
    ],
)
def test_how_a_key_is_presented(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert presented_key(headers) == expected


def gateway(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def test_hash_key_reads_stdin_only() -> None:
    key = new_key("k", ["aggregate"])
    res = gateway("hash-key", stdin=key.secret + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == key.config["hash"]
    # The key is never an argument (it would land in shell history and the process list).
    assert gateway("hash-key", key.secret).returncode == 2
    short = gateway("hash-key", stdin="password123\n")
    assert short.returncode == 2
    assert "at least 32" in short.stderr
    assert short.stdout == ""


def test_hash_key_generates_a_key_and_its_hash() -> None:
    res = gateway("hash-key", "--generate")
    assert res.returncode == 0
    lines = dict(line.split(":", 1) for line in res.stdout.strip().splitlines())
    key, digest = lines["key"].strip(), lines["hash"].strip()
    assert len(key) >= 32
    assert digest == hash_key(key)


def test_check_config_refuses_authentication_without_keys(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[server]\nport = 8080\n")
    res = gateway("check-config", str(config))
    assert res.returncode == 2
    assert "no keys are configured" in res.stderr
    config.write_text("[auth]\nenabled = false\n")
    assert gateway("check-config", str(config)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[auth.keys]]\nname = "k"\nhash = "md5:abc"\nscopes = ["everything"]\nupstreams = ["nope"]\n')
    res = gateway("check-config", str(bad))
    assert res.returncode == 2
    assert "auth.keys.0.hash" in res.stderr
    assert "auth.keys.0.scopes.0" in res.stderr


def test_serve_refuses_to_start_open_and_takes_keys_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[compute]\nenabled = false\n[server]\ndrain_delay_s = 0\n")
    res = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Refused before anything starts, as check-config refuses it: exit 2, one line, no traceback.
    assert res.returncode == 2, res.stderr
    assert "no keys are configured" in res.stderr
    assert "Traceback" not in res.stderr

    key = new_key("from-env", ["metrics"])
    env = {"GATEWAY_AUTH__KEYS": json.dumps([key.config])}
    with gateway_process(config, tmp_path, env=env, auth=True) as gw:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{gw.url}/metrics", timeout=5)
        assert info.value.code == 401
        info.value.close()
        request = urllib.request.Request(f"{gw.url}/metrics", headers=key.bearer)
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
    assert key.secret not in gw.stderr(), "a key must never be logged"

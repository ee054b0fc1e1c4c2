"""Properties over generated input: config parsing never fails but with ConfigError, and the JSON depth scan
agrees with a parser on every document."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ConfigError
from app.security.jsondepth import exceeds_depth, max_depth
from app.settings import Settings, load_settings

# -- config parsing ---------------------------------------------------------------------------------------------

SECTIONS = {
    "server": ["host", "port", "keepalive_timeout_s", "drain_delay_s", "log_level", "log_format"],
    "limits": ["max_sources", "max_body_bytes", "max_json_depth", "max_headers", "max_in_flight_requests"],
    "database": ["executor_threads", "queue_limit", "min_connections", "statement_timeout_ms"],
    "compute": ["enabled", "workers", "start_method", "queue_limit"],
    "auth": ["enabled"],
    "rate_limit": ["enabled", "rate_per_s", "burst", "backend", "redis_url", "failure_mode"],
    "cors": ["allow_origins", "max_age_s"],
    "observability": ["admin_port", "blocking_threshold_ms"],
}
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=40),
    st.sampled_from(["info", "json", "redis", "spawn", "fork", "http://127.0.0.1:1", "sha256:" + "a" * 64, ""]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string for these characters
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def safe_text(value: Any) -> bool:
    # Control characters other than tab cannot appear in a TOML basic string even escaped as JSON does (\\u0000 is
    # fine, but lone surrogates are not encodable): keep the generator within what a TOML file can say.
    return not (isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value))


@st.composite
def config_documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=5)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(SECTIONS[section] + ["bogus"]), unique=True, max_size=4)):
            value = draw(VALUES.filter(safe_text))
            lines.append(f"{key} = {toml_value(value)}")
    for i in range(draw(st.integers(0, 2))):
        lines.append(f"[upstreams.u{i}]")
        lines.append(
            f"base_url = {toml_value(draw(st.sampled_from(['http://127.0.0.1:1', 'ftp://x', '', 'http://'])))}"
        )
        lines.append(f"timeout_ms = {toml_value(draw(SCALARS.filter(safe_text)))}")
    for i in range(draw(st.integers(0, 2))):
        lines.append("[[auth.keys]]")
        lines.append(f'name = "k{i}"')
        lines.append(f"hash = {toml_value(draw(st.sampled_from(['sha256:' + 'b' * 64, 'md5:x', 'sha256:XYZ'])))}")
        lines.append(
            f"scopes = {toml_value(draw(st.lists(st.sampled_from(['aggregate', 'metrics', 'root']), max_size=3)))}"
        )
        if draw(st.booleans()):
            lines.append(f"upstreams = {toml_value(draw(st.lists(st.sampled_from(['u0', 'u1', 'nope']), max_size=2)))}")
    return "\n".join(lines) + "\n"


def load_text(text: str | bytes) -> Settings:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return load_settings(path, environ=False)


def problems_of(load: Any) -> list[str] | None:
    """None when the config loaded; its problems when it did not. Any other exception fails the test."""
    try:
        load()
    except ConfigError as exc:
        return exc.problems
    return None


def only_config_errors(text: str | bytes) -> None:
    problems = problems_of(lambda: load_text(text))
    assert problems is None or (problems and all(isinstance(p, str) and p for p in problems))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_documents())
def test_structured_configs_load_or_fail_with_config_error(text: str) -> None:
    only_config_errors(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_files_load_or_fail_with_config_error(raw: bytes) -> None:
    only_config_errors(raw)


ENV_NAMES = st.sampled_from(
    ["GATEWAY_AUTH__KEYS", "GATEWAY_SERVER__PORT", "GATEWAY_LIMITS", "GATEWAY_UPSTREAMS", "GATEWAY_RATE_LIMIT__BURST"]
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        ENV_NAMES,
        st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60).filter(lambda v: "\x00" not in v),
        max_size=3,
    )
)
def test_environment_overrides_load_or_fail_with_config_error(env: dict[str, str]) -> None:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        problems = problems_of(lambda: load_settings(None))
        assert problems is None or problems
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- JSON depth -------------------------------------------------------------------------------------------------

JSON_TEXT = st.text(alphabet=st.sampled_from('ab[]{}"\\ :,\n\u00e9'), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | JSON_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4),
    max_leaves=60,
)


def reference_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_depth_scan_agrees_with_a_parser(value: Any, compact: bool) -> None:
    raw = json.dumps(value, separators=(",", ":") if compact else None, ensure_ascii=compact).encode()
    depth = reference_depth(value)
    assert max_depth(raw) == depth
    assert exceeds_depth(raw, depth) is False
    if depth:
        assert exceeds_depth(raw, depth - 1) is True

"""Path confinement, as properties: whatever the client sends, the URL stays on the upstream's origin and base."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from app.upstream.paths import UnsafePathError, confine_path, join_url

BASE = "http://10.0.0.1:8080/api/v1"
segment_chars = st.characters(codec="utf-8", exclude_categories=("Cs",))
paths = st.one_of(
    st.text(segment_chars, max_size=60).map(lambda s: "/" + s),
    st.lists(
        st.sampled_from(["a", "..", ".", "%2e", "%2E%2e", "%2f", "%252e", "//", "\\", "b c", "é", "?", "#"]), max_size=8
    ).map(lambda parts: "/" + "/".join(parts)),
    st.text(segment_chars, max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(paths)
def test_confined_paths_never_escape(path: str) -> None:
    try:
        confined = confine_path(path)
        url = join_url(BASE, confined)
    except (UnsafePathError, UnicodeDecodeError):
        return
    assert (url.scheme, url.host, url.port) == ("http", "10.0.0.1", 8080)
    assert url.raw_path.startswith("/api/v1/")
    decoded_segments = unquote(url.raw_path).split("/")
    assert ".." not in decoded_segments
    assert "." not in decoded_segments
    assert "?" not in url.raw_path
    assert url.query_string == ""
    # Confinement is stable: a confined path confines to itself.
    assert confine_path(confined) == confined or "%" in unquote(confined)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=10), min_size=1, max_size=5
    )
)
def test_plain_paths_pass_unchanged(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    assert confine_path(path) == path
    assert join_url(BASE, path) == URL(BASE + path)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("//evil.example/x", "empty segments"),
        ("/%2e%2e/x", "'.' or '..'"),
        ("/%252e%252e/x", "twice"),
        ("http://x/y", "start with '/'"),
        ("/a\\b", "backslashes"),
        ("/a?b=1", "query string"),
        ("/\x00", "control characters"),
    ],
)
def test_reasons_are_specific(path: str, why: str) -> None:
    with pytest.raises(UnsafePathError, match=why):
        confine_path(path)

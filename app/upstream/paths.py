"""Path confinement: a client names a path on a configured upstream, never a host, a scheme or a way out."""

from __future__ import annotations

import functools
from urllib.parse import quote, unquote

from yarl import URL

# Characters RFC 3986 allows unescaped in a path segment; everything else is percent-encoded on the way out.
_SAFE = "/:@!$&'()*+,;=-._~"


class UnsafePathError(ValueError):
    pass


def confine_path(path: str) -> str:
    """Validate a client-supplied path and return it normalised and percent-encoded.

    Raises UnsafePathError for anything that could leave the upstream's origin or its base path: absolute URLs,
    scheme-relative ``//host``, backslashes, ``.``/``..`` segments (also percent-encoded, also double-encoded),
    empty segments, control characters, and query strings or fragments (query parameters go in ``params``).
    """
    if not path.startswith("/"):
        raise UnsafePathError("path must start with '/'")
    decoded = unquote(path, errors="strict")
    if unquote(decoded, errors="strict") != decoded:
        raise UnsafePathError("path must not be percent-encoded twice")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise UnsafePathError("path must not contain control characters")
    for bad, why in (("\\", "backslashes"), ("?", "a query string (use params)"), ("#", "a fragment")):
        if bad in decoded:
            raise UnsafePathError(f"path must not contain {why}")
    segments = decoded.split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        raise UnsafePathError("path must not contain '.' or '..' segments")
    if any(seg == "" for seg in segments[:-1]):
        raise UnsafePathError("path must not contain empty segments ('//')")
    return quote(decoded, safe=_SAFE)


def encode_path_text(text: str) -> str:
    """Part of a path that confine_path accepted whole, encoded as confine_path encodes it (so that the parts of a
    path with references in it, encoded one by one, join to what the whole would have been)."""
    return quote(unquote(text, errors="strict"), safe=_SAFE)


@functools.lru_cache(maxsize=256)
def _base(base_url: str) -> tuple[tuple[str, str | None, int | None], str]:
    """A configured base URL's origin and path, parsed once."""
    base = URL(base_url)
    return (base.scheme, base.host, base.port), base.raw_path


def join_url(base_url: str, confined_path: str) -> URL:
    """Join a configured base URL and a confined path, and check the result stayed on the base's origin."""
    origin, base_path = _base(base_url)
    url = URL(base_url + confined_path, encoded=True)
    if (url.scheme, url.host, url.port) != origin:
        raise UnsafePathError("path leaves the upstream's origin")
    if not url.raw_path.startswith(base_path.rstrip("/") + "/") and url.raw_path != base_path:
        raise UnsafePathError("path leaves the upstream's base path")
    return url


# Paths up to this long are remembered (a few thousand of them): most requests name the same few paths, and a
# remembered one costs a dictionary lookup instead of two decodes, a scan and a URL parse (about 3 us).
_REMEMBERED_PATH_CHARS = 256


def target_url(base_url: str, path: str) -> URL:
    """``join_url(base_url, confine_path(path))``: a client's path on a configured upstream, checked and joined.
    Raises UnsafePathError and UnicodeDecodeError as those do (a refusal is never remembered)."""
    if len(path) > _REMEMBERED_PATH_CHARS:
        return join_url(base_url, confine_path(path))
    return _remembered_target(base_url, path)


@functools.lru_cache(maxsize=4096)
def _remembered_target(base_url: str, path: str) -> URL:
    return join_url(base_url, confine_path(path))

"""RFC 9111 for a shared cache, rule by rule (pure functions; the clock is a number)."""

from __future__ import annotations

import email.utils

import pytest
from multidict import CIMultiDict

from app.upstream.cache.policy import freshness, parse_cache_control, request_rules

NOW = 1_700_000_000.0


def fresh(headers: dict[str, str], *, status: int = 200, private: bool = False, ttl: float = 0.0) -> float | None:
    got = freshness(status, CIMultiDict(headers), private_request=private, default_ttl_s=ttl, now=NOW)
    return None if got is None else got.lifetime_s - got.age_s


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def test_parse_cache_control() -> None:
    assert parse_cache_control('Public, MAX-AGE="60", no-cache') == {"public": None, "max-age": "60", "no-cache": None}
    assert parse_cache_control(None) == {}
    assert parse_cache_control(" , ,") == {}


@pytest.mark.parametrize(
    ("headers", "ttl", "expected"),
    [
        ({}, 0.0, None),  # nothing said, no default: not stored
        ({}, 30.0, 30.0),  # the default stands in when the upstream says nothing
        ({"Cache-Control": "max-age=60"}, 30.0, 60.0),
        ({"Cache-Control": "max-age=60, s-maxage=10"}, 0.0, 10.0),  # s-maxage wins in a shared cache
        ({"Cache-Control": "max-age=0"}, 30.0, None),
        ({"Cache-Control": "max-age=abc"}, 30.0, None),  # invalid: stale at once
        ({"Cache-Control": "max-age=60", "Age": "50"}, 0.0, 10.0),
        ({"Cache-Control": "max-age=60", "Age": "60"}, 0.0, None),
        ({"Cache-Control": "no-store, max-age=60"}, 30.0, None),
        ({"Cache-Control": "no-cache, max-age=60"}, 30.0, None),
        ({"Cache-Control": "private, max-age=60"}, 30.0, None),
        ({"Cache-Control": "public"}, 30.0, 30.0),
        ({"Expires": http_date(NOW + 120), "Date": http_date(NOW)}, 0.0, 120.0),
        ({"Expires": http_date(NOW + 120)}, 0.0, 120.0),  # no Date: measured from now
        ({"Expires": "0"}, 30.0, None),  # invalid Expires: already expired
        ({"Expires": http_date(NOW + 120), "Cache-Control": "max-age=5"}, 0.0, 5.0),  # max-age beats Expires
        ({"Cache-Control": "max-age=60", "Vary": "*"}, 0.0, None),
        ({"Cache-Control": "max-age=60", "Vary": "Accept-Language, X-Request-ID"}, 0.0, None),
        ({"Cache-Control": "max-age=60", "Vary": "Accept-Language"}, 0.0, 60.0),
    ],
)
def test_freshness(headers: dict[str, str], ttl: float, expected: float | None) -> None:
    got = fresh(headers, ttl=ttl)
    assert got == (pytest.approx(expected, abs=1) if expected is not None else None)


@pytest.mark.parametrize("status", [201, 206, 301, 404, 500])
def test_only_success_statuses_are_stored(status: int) -> None:
    assert fresh({"Cache-Control": "max-age=60"}, status=status) is None


def test_a_multi_line_cache_control_is_read_whole() -> None:
    headers = CIMultiDict([("Cache-Control", "max-age=60"), ("Cache-Control", "no-store")])
    assert freshness(200, headers, private_request=False, default_ttl_s=0, now=NOW) is None


@pytest.mark.parametrize(
    ("headers", "shared"),
    [
        ({"Cache-Control": "max-age=60"}, False),  # credentials forwarded, not marked shared: never stored
        ({"Cache-Control": "public, max-age=60"}, True),
        ({"Cache-Control": "s-maxage=60"}, True),
        ({"Cache-Control": "public, max-age=60", "Vary": "Authorization"}, False),  # would be keyed by a secret
        ({"Cache-Control": "public, max-age=60", "Vary": "cookie"}, False),
    ],
)
def test_answers_to_credentialed_requests(headers: dict[str, str], shared: bool) -> None:
    got = freshness(200, CIMultiDict(headers), private_request=True, default_ttl_s=30, now=NOW)
    assert (got is not None) == shared
    if got is not None:
        assert got.with_credentials


def test_an_answer_stored_without_credentials_serves_only_requests_without() -> None:
    got = freshness(200, CIMultiDict({"Cache-Control": "max-age=60"}), private_request=False, default_ttl_s=0, now=NOW)
    assert got is not None
    assert not got.with_credentials
    public = freshness(200, CIMultiDict({"Cache-Control": "public, max-age=60"}), private_request=False,
                       default_ttl_s=0, now=NOW)  # fmt: skip
    assert public is not None
    assert public.with_credentials


@pytest.mark.parametrize(
    ("cc", "stale_ok"),
    [("max-age=60", True), ("max-age=60, must-revalidate", False), ("max-age=60, proxy-revalidate", False),
     ("s-maxage=60", False)],
)  # fmt: skip
def test_revalidation_forbids_stale(cc: str, stale_ok: bool) -> None:
    got = freshness(200, CIMultiDict({"Cache-Control": cc}), private_request=False, default_ttl_s=0, now=NOW)
    assert got is not None
    assert got.stale_ok is stale_ok


@pytest.mark.parametrize(
    ("cc", "pragma", "lookup", "store"),
    [
        (None, None, True, True),
        ("no-store", None, False, False),
        ("no-cache", None, False, True),
        ("max-age=0", None, False, True),
        ("max-age=10", None, True, True),
        (None, "no-cache", False, True),
        ("max-age=10", "no-cache", True, True),  # Pragma is ignored beside Cache-Control
    ],
)
def test_request_directives(cc: str | None, pragma: str | None, lookup: bool, store: bool) -> None:
    rules = request_rules(cc, pragma)
    assert (rules.lookup, rules.store) == (lookup, store)


@pytest.mark.parametrize("value", ["99999999999999999999999", "\uff11\uff12", "-5", "1e3", " 7 "])
def test_odd_delta_seconds_never_raise(value: str) -> None:
    got = freshness(200, CIMultiDict({"Cache-Control": f"max-age={value}", "Age": value}), private_request=False,
                    default_ttl_s=0, now=NOW)  # fmt: skip
    assert got is None or 0 < got.lifetime_s <= 2**31


@pytest.mark.parametrize("expires", ["Thu, 01 Jan 99999 00:00:00 GMT", "garbage", "", "Mon, 32 Foo 2020 99:99:99 GMT"])
def test_odd_expires_never_raise(expires: str) -> None:
    assert fresh({"Expires": expires, "Date": "nonsense"}, ttl=30) is None

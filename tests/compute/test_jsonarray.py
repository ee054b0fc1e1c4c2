"""The sliced JSON reader against orjson + NumPy, and every way a body can be wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.compute import jsonarray
from app.errors import (
    InvalidInputError,
    InvalidParamsError,
    MalformedInputError,
    NonNumericDataError,
    PayloadTooLargeError,
    ProblemError,
    RaggedDataError,
    UnsupportedRankError,
    ValidationFailedError,
)


def decode(body: bytes, max_rank: int = 8) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    request = jsonarray.run_blocking(jsonarray.parse_request(body, max_rank=max_rank))
    out = np.empty(request.data.count, dtype=request.data.dtype)
    jsonarray.run_blocking(jsonarray.fill(body, request.data, out))
    return out.reshape(request.data.shape), request.params


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, floats=st.booleans(), data=st.data(), spaced=st.booleans())
def test_matches_orjson_and_numpy(shape: tuple[int, ...], floats: bool, data: st.DataObject, spaced: bool) -> None:
    count = int(np.prod(shape)) if shape else 1
    elements = (
        st.floats(allow_nan=False, allow_infinity=False, width=64) if floats else st.integers(-(2**63), 2**63 - 1)
    )
    flat = data.draw(st.lists(elements, min_size=count, max_size=count))
    expected = np.array(flat, dtype=np.float64 if floats else np.int64).reshape(shape)
    text = orjson.dumps(expected.tolist())
    if spaced:
        text = text.replace(b",", b" ,\n ").replace(b"[", b"[ ").replace(b"]", b" ]")
    body = b'{"params": {"k": [1, "]"]}, "data": ' + text + b"}"
    got, params = decode(body)
    assert params == {"k": [1, "]"]}
    assert got.shape == expected.shape
    if floats and not any(c in text for c in b".eE"):
        np.testing.assert_array_equal(got, expected.astype(np.int64))
    else:
        np.testing.assert_array_equal(got, expected)


def test_large_bodies_are_read_in_many_short_steps() -> None:
    values = np.random.default_rng(7).standard_normal((300, 1000))
    body = orjson.dumps({"data": values.tolist()})
    steps = jsonarray.parse_request(body, max_rank=8)
    count = 0
    while True:
        try:
            next(steps)
            count += 1
        except StopIteration as stop:
            request = stop.value
            break
    assert count >= len(body) // jsonarray.SCAN_BLOCK
    assert request.data.shape == (300, 1000)
    got, _ = decode(body)
    np.testing.assert_array_equal(got, values)


def test_key_order_whitespace_and_missing_params() -> None:
    got, params = decode(b' \n{ "params" : {"axis": 0} ,\t"data" : [ [1, 2] , [3, 4] ] }\n')
    assert params == {"axis": 0}
    np.testing.assert_array_equal(got, [[1, 2], [3, 4]])
    got, params = decode(b'{"data": -1.5e3}')
    assert params == {}
    assert got.shape == ()
    assert float(got) == -1500.0


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b'{"data": ["a", 1]}', NonNumericDataError, "found a string at byte 10"),
        (b'{"data": [true]}', NonNumericDataError, "found a boolean"),
        (b'{"data": [1, null]}', NonNumericDataError, "found null"),
        (b'{"data": "12"}', NonNumericDataError, "must be a number"),
        (b'{"data": {"a": 1}}', NonNumericDataError, "an object"),
        (b'{"data": [[1, 2], [3]]}', RaggedDataError, "depth 2"),
        (b'{"data": [1, [2, 3]]}', RaggedDataError, "different nesting depths"),
        (b'{"data": [[1, 2], []]}', RaggedDataError, "different numbers"),
        (b'{"data": [1, , 2]}', RaggedDataError, "empty element"),
        (b'{"data": []}', InvalidInputError, "no numbers"),
        (b'{"data": [[[[1]]]]}', UnsupportedRankError, "more than 3 deep"),
        (b'{"data": [1.2.3]}', MalformedInputError, "invalid number"),
        (b'{"data": [01]}', MalformedInputError, "invalid number"),
        (b'{"data": [1, 2}', MalformedInputError, "unexpected '}' at byte 14"),
        (b'{"data": [1, 2]', MalformedInputError, "expected ',' or '}'"),
        (b'{"data": [1, 2]} x', MalformedInputError, "trailing data"),
        (b"[1, 2]", MalformedInputError, "must be a JSON object"),
        (b'{"data": [1], "data": [2]}', ValidationFailedError, "'data' is given twice"),
        (b'{"data": [1], "params": {}, "params": {}}', ValidationFailedError, "'params' is given twice"),
        (b'{"data": [1], "params": {"axis": 0, "axis": 1}}', InvalidParamsError, "given twice"),
        (b'{"data": [1], "params": null}', InvalidParamsError, "must be a JSON object"),
        (b'{"params": {}}', ValidationFailedError, "'data' is required"),
        (b'{"data": [1], "extra": 1}', ValidationFailedError, "unknown field"),
        (b'{"data": [1], "params": [1]}', InvalidParamsError, "must be a JSON object"),
        (b'{"data": [1], "params": {"a": "unterminated}', MalformedInputError, "unterminated"),
        (b'{"data": [99999999999999999999]}', InvalidInputError, "64 bits"),
        (b'{"data": [1e999]}', MalformedInputError, "invalid number"),
    ],
)
def test_bad_bodies_are_named(body: bytes, error: type[ProblemError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        decode(body, max_rank=3)
    assert type(info.value) is error  # the most specific problem, not a parent


def test_params_are_bounded() -> None:
    body = b'{"params": {"pad": "' + b"x" * (jsonarray.ENVELOPE_LIMIT + 10) + b'"}, "data": [1]}'
    with pytest.raises(PayloadTooLargeError, match="at most 65536 bytes"):
        decode(body)

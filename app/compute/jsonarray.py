"""JSON request bodies to arrays, on the event loop, in slices of about a millisecond.

A 20 MB body takes ``orjson.loads`` some 70 ms and ``np.asarray`` of the resulting list 20 to 120 ms more, all
holding the GIL: in a thread it would stall the loop just the same. So the body is never parsed in one call:

1. The small envelope (``{"data": ..., "params": {...}}``, any key order) is walked with bounded regex steps.
2. The ``data`` value is scanned with NumPy, 256 KiB per step: only digits, signs, ``.eE``, brackets, commas and
   whitespace may occur (anything else is non-numeric data, named with its byte offset); a running bracket depth
   gives the rank, and per-depth comma counts prove every list at a depth has the same length, which gives the
   shape. Rank, element count and element type are known, and checked, before a single number is converted.
3. Numbers are parsed in windows of about 256 KiB cut at commas, brackets blanked out: the text order of the
   numbers is the array's C order, and the scan already proved the nesting. Each window goes through orjson and
   straight into the destination (a shared-memory segment for large arrays).

Each step is a ``yield`` of a generator; ``run_sliced`` drives one on the loop, giving other tasks a turn between
steps. Errors are the gateway's problem types; nothing here raises a bare ValueError at a client.
"""

from __future__ import annotations

import asyncio
import mmap
import re
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

from app.errors import (
    InvalidInputError,
    InvalidParamsError,
    MalformedInputError,
    NonNumericDataError,
    PayloadTooLargeError,
    RaggedDataError,
    UnsupportedRankError,
    ValidationFailedError,
)
from app.jsonkeys import duplicate_keys

T = TypeVar("T")
Buffer = bytes | bytearray | mmap.mmap  # the body; slicing it gives bytes, indexing an int
Steps = Generator[None, None, T]

SCAN_BLOCK = 128 * 1024
PARSE_WINDOW = 128 * 1024
ENVELOPE_LIMIT = 64 * 1024  # everything but "data" (params, unknown keys), in bytes

_WS = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\.)*"')
_SCALAR = re.compile(rb"[^,}\]\s]+")
_STRUCT = re.compile(rb'["\[\]{}]')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BLANK_BRACKETS = bytes.maketrans(b"[]", b"  ")

_OPEN = ord("[")


def _classes() -> npt.NDArray[np.uint8]:
    table = np.full(256, _INVALID, dtype=np.uint8)
    for chars, cls in ((b"0123456789+-", _DIGIT), (b".eE", _FLOAT), (b"[", _OPEN_C), (b"]", _CLOSE_C)):
        table[list(chars)] = cls
    table[list(b",")] = _COMMA_C
    table[list(b" \t\n\r")] = _SPACE
    return table


# Byte classes: one table lookup per byte tells everything the scan needs.
_INVALID, _DIGIT, _FLOAT, _OPEN_C, _CLOSE_C, _COMMA_C, _SPACE = range(7)
_CLASS = _classes()


@dataclass(frozen=True)
class DataLayout:
    start: int
    end: int
    shape: tuple[int, ...]
    is_float: bool  # any '.', 'e' or 'E': float64; otherwise every number is an integer (int64)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float64 if self.is_float else np.int64)


@dataclass(frozen=True)
class JsonRequest:
    data: DataLayout
    params: dict[str, Any]


async def run_sliced(steps: Steps[T]) -> T:
    """Drive a generator of steps on the loop, letting other tasks run between steps."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result
        await asyncio.sleep(0)


def run_blocking(steps: Steps[T]) -> T:
    """Drive a generator of steps to its end at once (tests, tools)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result


# -- the envelope --------------------------------------------------------------------------------------------------


def _ws(buf: Buffer, pos: int) -> int:
    match = _WS.match(buf, pos)
    assert match is not None  # `*` always matches
    return match.end()


def _expect(buf: Buffer, pos: int, char: bytes, what: str) -> int:
    if buf[pos : pos + 1] != char:
        found = "the end of the body" if pos >= len(buf) else repr(chr(buf[pos]))
        raise MalformedInputError(f"invalid JSON: expected {what} at byte {pos}, found {found}")
    return pos + 1


def _skip_value(buf: Buffer, pos: int) -> int:
    """End of the JSON value at ``pos`` (any type), looking at most ENVELOPE_LIMIT bytes ahead."""
    limit = min(len(buf), pos + ENVELOPE_LIMIT + 1)
    if pos >= len(buf):
        raise MalformedInputError("invalid JSON: the body ends where a value was expected")
    first = buf[pos]
    if first == ord('"'):
        match = _STRING.match(buf, pos, limit)
        if match is None:
            raise _envelope_problem(buf, pos, limit)
        return match.end()
    if first in b"[{":
        depth, i = 0, pos
        while True:
            found = _STRUCT.search(buf, i, limit)
            if found is None:
                raise _envelope_problem(buf, pos, limit)
            char = buf[found.start()]
            if char == ord('"'):
                string = _STRING.match(buf, found.start(), limit)
                if string is None:
                    raise _envelope_problem(buf, pos, limit)
                i = string.end()
                continue
            depth += 1 if char in b"[{" else -1
            i = found.end()
            if depth == 0:
                return i
    match = _SCALAR.match(buf, pos, limit)
    if match is None:
        raise MalformedInputError(f"invalid JSON: no value at byte {pos}")
    return match.end()


def _envelope_problem(buf: Buffer, pos: int, limit: int) -> Exception:
    if limit < len(buf):
        return PayloadTooLargeError(f"fields other than 'data' may take at most {ENVELOPE_LIMIT} bytes")
    return MalformedInputError(f"invalid JSON: unterminated value starting at byte {pos}")


def _loads(raw: bytes | bytearray, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedInputError(f"invalid JSON in {what}: {exc}") from exc


def parse_request(buf: Buffer, *, max_rank: int) -> Steps[JsonRequest]:
    """Parse ``{"data": ..., "params": {...}}``: the data's layout (not its numbers yet) and the params."""
    pos = _ws(buf, 0)
    if buf[pos : pos + 1] != b"{":
        raise MalformedInputError('the body must be a JSON object: {"data": ..., "params": {...}}')
    pos = _ws(buf, pos + 1)
    layout: DataLayout | None = None
    params: Any = {}  # absent: none; present, it must be an object (null is not one, as the document says)
    seen: set[str] = set()
    unknown: list[str] = []
    envelope = 0
    if buf[pos : pos + 1] == b"}":
        pos += 1
    else:
        while True:
            pos = _ws(buf, pos)
            key_match = _STRING.match(buf, pos, min(len(buf), pos + 1024))
            if key_match is None:
                raise MalformedInputError(f"invalid JSON: expected a field name at byte {pos}")
            key = _loads(key_match.group(), "a field name")
            pos = _ws(buf, _expect(buf, _ws(buf, key_match.end()), b":", "':'"))
            if key in seen:
                msg = f"the key {key!r} is given twice"
                raise ValidationFailedError(msg, errors=[{"loc": key, "msg": msg, "type": "duplicate_key"}])
            seen.add(key)
            if key == "data":
                layout = yield from _scan_data(buf, pos, max_rank)
                pos = layout.end
            else:
                end = _skip_value(buf, pos)
                envelope += end - pos
                if envelope > ENVELOPE_LIMIT:
                    raise PayloadTooLargeError(f"fields other than 'data' may take at most {ENVELOPE_LIMIT} bytes")
                value = _loads(buf[pos:end], f"the field {key!r}")
                if key == "params":
                    params = value
                    # orjson kept the last of duplicate keys; the envelope is small, so the exact check is cheap.
                    twice = duplicate_keys(buf[pos:end])
                    if twice:
                        errors = [
                            {"loc": ".".join(map(str, ("params", *loc))), "msg": "given twice", "type": "duplicate_key"}
                            for loc in twice
                        ]
                        raise InvalidParamsError("a key in 'params' is given twice", errors=errors)
                else:
                    unknown.append(key)
                pos = end
            pos = _ws(buf, pos)
            if buf[pos : pos + 1] == b",":
                pos += 1
                continue
            pos = _expect(buf, pos, b"}", "',' or '}'")
            break
    if _ws(buf, pos) != len(buf):
        raise MalformedInputError(f"invalid JSON: trailing data after the object, at byte {_ws(buf, pos)}")
    if unknown:
        raise ValidationFailedError(
            f"unknown field(s) {', '.join(map(repr, unknown))}: a request has 'data' and optional 'params'"
        )
    if layout is None:
        raise ValidationFailedError("the field 'data' is required")
    if not isinstance(params, dict):
        raise InvalidParamsError("'params' must be a JSON object")
    return JsonRequest(layout, params)


# -- the data: scan ------------------------------------------------------------------------------------------------


def _scan_data(buf: Buffer, start: int, max_rank: int) -> Steps[DataLayout]:
    if start >= len(buf):
        raise MalformedInputError("invalid JSON: the body ends where 'data' was expected")
    first = buf[start]
    if first != _OPEN:
        number = _NUMBER.match(buf, start)
        if number is None:
            raise NonNumericDataError(
                f"'data' must be a number or a (nested) list of numbers; found {_describe(first)} at byte {start}"
            )
        text = number.group()
        return DataLayout(start, number.end(), (), any(c in b".eE" for c in text))
    return (yield from _scan_array(buf, start, max_rank))


def _describe(byte: int) -> str:
    char = chr(byte)
    names = {'"': "a string", "t": "a boolean", "f": "a boolean", "n": "null", "{": "an object"}
    return names.get(char, repr(char))


def _scan_array(buf: Buffer, start: int, max_rank: int) -> Steps[DataLayout]:
    data = np.frombuffer(buf, dtype=np.uint8)
    size = len(buf)
    depth_carry = 0
    prev_in_number = False
    numbers = 0
    number_depths = (max_rank + 1, 0)  # (min, max) depth at which numbers start
    is_float = False
    max_depth = 0
    # Per depth d (index d): commas seen inside depth-d lists, the comma count when the open list began, the
    # comma count every list at that depth must have, and how many lists there were.
    commas_run = [0] * (max_rank + 2)
    pending: list[int | None] = [None] * (max_rank + 2)
    expected: list[int | None] = [None] * (max_rank + 2)
    lists = [0] * (max_rank + 2)
    pos, end = start, -1
    while end < 0:
        if pos >= size:
            raise MalformedInputError("invalid JSON: the body ends inside the 'data' array")
        chars = data[pos : min(size, pos + SCAN_BLOCK)]
        classes = _CLASS[chars]
        opens = classes == _OPEN_C
        closes = classes == _CLOSE_C
        depth = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32)
        depth += depth_carry
        closed = np.flatnonzero(depth == 0)
        if closed.size:
            cut = int(closed[0]) + 1
            chars, classes, opens, closes, depth = chars[:cut], classes[:cut], opens[:cut], closes[:cut], depth[:cut]
            end = pos + cut
        bad = np.flatnonzero(classes == _INVALID)
        if bad.size:
            at = int(bad[0])
            if chars[at] in b"}:":
                raise MalformedInputError(f"invalid JSON: unexpected {chr(chars[at])!r} at byte {pos + at}")
            raise NonNumericDataError(
                f"'data' may hold only numbers and lists of numbers; found {_describe(int(chars[at]))} "
                f"at byte {pos + at}"
            )
        block_max = int(depth.max())
        if block_max > max_rank:
            raise UnsupportedRankError(f"'data' nests lists more than {max_rank} deep")
        max_depth = max(max_depth, block_max)
        floats = classes == _FLOAT
        in_number = floats | (classes == _DIGIT)
        number_starts = in_number.copy()
        number_starts[1:] &= ~in_number[:-1]
        number_starts[0] &= not prev_in_number
        starts = np.flatnonzero(number_starts)
        if starts.size:
            numbers += int(starts.size)
            at_depth = depth[starts]
            number_depths = (
                min(number_depths[0], int(at_depth.min())),
                max(number_depths[1], int(at_depth.max())),
            )
        is_float = is_float or bool(floats.any())
        commas = classes == _COMMA_C
        for d in range(1, max_depth + 1):
            # Commas inside depth-d lists, and where depth-d lists open and close: the number of those commas
            # before an open and before its close gives that list's element count minus one.
            comma_at = np.flatnonzero(commas & (depth == d))
            opened = commas_run[d] + np.searchsorted(comma_at, np.flatnonzero(opens & (depth == d)))
            ended = commas_run[d] + np.searchsorted(comma_at, np.flatnonzero(closes & (depth == d - 1)))
            carried = pending[d]
            begun = opened if carried is None else np.concatenate((np.array([carried], dtype=np.int64), opened))
            if ended.size:
                per_list = ended - begun[: ended.size]
                want = int(per_list[0]) if expected[d] is None else expected[d]
                if (per_list != want).any():
                    raise RaggedDataError(f"lists at depth {d} of 'data' hold different numbers of elements")
                expected[d] = want
            pending[d] = int(begun[ended.size]) if begun.size > ended.size else None
            lists[d] += int(opened.size)
            commas_run[d] += int(comma_at.size)
        depth_carry = int(depth[-1])
        prev_in_number = bool(in_number[-1])
        pos += chars.size
        yield
    if numbers == 0:
        raise InvalidInputError("'data' holds no numbers")
    if number_depths != (max_depth, max_depth):
        raise RaggedDataError("numbers in 'data' sit at different nesting depths")
    shape = tuple((expected[d] or 0) + 1 for d in range(1, max_depth + 1))
    for d in range(1, max_depth):
        if lists[d + 1] != lists[d] * shape[d - 1]:
            raise RaggedDataError(f"lists at depth {d} of 'data' hold different numbers of elements")
    if numbers != lists[max_depth] * shape[-1]:
        raise RaggedDataError(
            f"'data' holds {numbers} number(s) where its nesting implies {lists[max_depth] * shape[-1]} "
            "(an empty element, or lists of unequal length)"
        )
    return DataLayout(start, end, shape, is_float)


# -- the data: numbers ---------------------------------------------------------------------------------------------


def fill(buf: Buffer, layout: DataLayout, out: npt.NDArray[Any]) -> Steps[None]:
    """Parse the numbers of ``layout`` into ``out`` (flat, ``layout.count`` long, of ``layout.dtype``)."""
    pos, end, written = layout.start, layout.end, 0
    while pos < end:
        cut = min(end, pos + PARSE_WINDOW)
        if cut < end:
            comma = buf.find(b",", cut, end)
            cut = end if comma < 0 else comma
        window = b"[" + buf[pos:cut].translate(_BLANK_BRACKETS) + b"]"
        try:
            values = orjson.loads(window)
        except orjson.JSONDecodeError as exc:
            raise MalformedInputError(f"invalid number in 'data' between bytes {pos} and {cut}: {exc.msg}") from exc
        if not isinstance(values, list):  # a scalar 'data'
            values = [values]
        converted = _convert(values, layout.is_float)
        if written + converted.size > out.size:
            raise RaggedDataError("'data' holds more numbers than its nesting implies")
        out[written : written + converted.size] = converted
        written += converted.size
        pos = cut + 1
        yield
    if written != out.size:
        raise RaggedDataError("'data' holds fewer numbers than its nesting implies")


def _convert(values: list[Any], is_float: bool) -> npt.NDArray[Any]:
    dtype = np.float64 if is_float else np.int64
    try:
        return np.fromiter(values, dtype=dtype, count=len(values))
    except OverflowError as exc:
        # Without '.', 'e' or 'E' every number is an integer; orjson reads those beyond 64 bits as floats, and
        # both overflow here.
        raise InvalidInputError("integers in 'data' must fit in 64 bits (signed)") from exc

"""NumPy's ``.npy`` format: reading a header from the first bytes of a body, writing one for an answer.

Only versions 1.0 and 2.0 are read (``np.save`` writes 1.0; 3.0 exists for structured types with non-Latin field
names, which no transform accepts). The header is parsed by NumPy's own safe reader (a literal, never a pickle),
and object arrays are refused before a single data byte is read.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import MalformedInputError

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000  # numpy's own default limit for untrusted headers


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    header_len: int  # bytes before the data

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def data_len(self) -> int:
        return self.count * self.dtype.itemsize


def header_length(prefix: bytes | bytearray) -> int | None:
    """How many bytes the header takes, once ``prefix`` holds enough to tell; None while it does not.

    Raises MalformedInputError when the prefix cannot start a .npy file.
    """
    if len(prefix) < 8:
        if not MAGIC.startswith(bytes(prefix[:6])):
            raise MalformedInputError("the body is not a .npy file (bad magic)")
        return None
    if bytes(prefix[:6]) != MAGIC:
        raise MalformedInputError("the body is not a .npy file (bad magic)")
    major, minor = prefix[6], prefix[7]
    if (major, minor) == (1, 0):
        if len(prefix) < 10:
            return None
        hlen = int(struct.unpack_from("<H", prefix, 8)[0])
        total = 10 + hlen
    elif (major, minor) == (2, 0):
        if len(prefix) < 12:
            return None
        hlen = int(struct.unpack_from("<I", prefix, 8)[0])
        total = 12 + hlen
    else:
        raise MalformedInputError(f".npy format version {major}.{minor} is not supported (1.0 and 2.0 are)")
    if hlen > MAX_HEADER_BYTES:
        raise MalformedInputError(f"the .npy header is {hlen} bytes, more than {MAX_HEADER_BYTES}")
    return total


def parse_header(raw: bytes | bytearray) -> NpyHeader:
    """Parse the full header (``header_length()`` bytes). Raises MalformedInputError."""
    stream = io.BytesIO(bytes(raw))
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
    except Exception as exc:  # numpy's reader raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise MalformedInputError(f"the .npy header is invalid: {exc}") from exc
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise MalformedInputError("the .npy header has an invalid shape")
    return NpyHeader(tuple(shape), np.dtype(dtype), bool(fortran_order), len(raw))


def encode_header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    """A version 1.0 header for a C-ordered array (its length is a multiple of 64, so the data stays aligned)."""
    stream = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()

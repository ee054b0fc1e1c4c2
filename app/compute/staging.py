"""Request bodies to checked input arrays, on the event loop, ready for a worker (gateway side).

Every check a transform declares runs here, before anything reaches a worker: size (413 as soon as the running
count passes the limit, without reading on), syntax, element type, rank, element count, NaN/inf, params, and the
transform's own value check. Arrays of ``shm_threshold_bytes`` or more are written straight into a shared-memory
segment (JSON numbers as they are parsed, ``.npy`` bytes as they arrive), reserved first with ``posix_fallocate``;
when /dev/shm cannot hold one, the array stays in gateway memory and goes through the worker's pipe instead.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import typing
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ValidationError

from app.compute import jsonarray
from app.compute.reaper import Closable
from app.errors import (
    InvalidInputError,
    InvalidParamsError,
    MalformedInputError,
    NonFiniteDataError,
    PayloadTooLargeError,
    TooManyElementsError,
    UnsupportedDtypeError,
    UnsupportedRankError,
)
from app.settings import ComputeSettings
from app.worker import npyfmt, shm
from app.worker.spec import TransformInputError, TransformSpec
from app.worker.wire import InlineArray, ShmArray

log = logging.getLogger(__name__)

FINITE_SLICE = 1 << 20  # elements checked for NaN/inf per step
COPY_YIELD_BYTES = 4 << 20


class Stager(typing.Protocol):
    """What staging needs from the pool: segment names, whether to use shared memory at all, and where to release
    large buffers (off the loop)."""

    namer: shm.SegmentNamer
    shm_enabled: bool

    def count_input_fallback(self) -> None: ...
    def dispose(self, *, close: Iterable[Closable] = (), drop: Iterable[object] = ()) -> None: ...


@dataclass(eq=False)
class StagedInput:
    """A checked input array, in a segment or in gateway memory. ``close()`` unlinks and unmaps the segment."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    segment: shm.Segment | None = None
    inline: npt.NDArray[Any] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def array(self) -> npt.NDArray[Any]:
        """A view of the array (drop it before close(), or the mapping lives until it dies)."""
        if self.inline is not None:
            return self.inline
        assert self.segment is not None
        view = self.segment.array((self.nbytes // self.dtype.itemsize,), self.dtype)
        return view.reshape(self.shape, order="F" if self.fortran_order else "C")

    def ref(self) -> ShmArray | InlineArray:
        if self.segment is not None:
            return ShmArray(self.segment.name, self.shape, self.dtype.str, self.fortran_order)
        assert self.inline is not None
        return InlineArray(self.inline)

    def unlink(self) -> None:
        if self.segment is not None:
            self.segment.unlink()

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
        self.inline = None


def discard(staged: StagedInput, stager: Stager) -> None:
    """Unlink at once; unmap off the loop."""
    staged.unlink()
    stager.dispose(close=[staged])


async def read_body(stream: AsyncIterator[bytes], limit: int, *, content_length: int | None = None) -> mmap.mmap:
    """The whole body, refusing with 413 as soon as it passes ``limit`` (the rest is never read).

    The body lands in an anonymous mapping: its pages are touched a chunk at a time as data arrives, where a
    ``bytearray`` would zero (or, growing, copy) all 20 MB of it in one go on the loop. Hand it to the reaper when
    done (``Stager.dispose``) rather than closing it: arrays made on it may still be alive.
    """
    if content_length is None:
        chunks: list[bytes] = []
        received = 0
        async for chunk in stream:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLargeError(f"the body exceeds {limit} bytes")
            chunks.append(chunk)
        if received == 0:
            raise MalformedInputError("the body is empty")
        body = mmap.mmap(-1, received)
        written = 0
        for chunk in chunks:
            body[written : written + len(chunk)] = chunk
            written += len(chunk)
            if written % COPY_YIELD_BYTES < len(chunk):
                await asyncio.sleep(0)
        return body
    if content_length == 0:
        raise MalformedInputError("the body is empty")
    body = mmap.mmap(-1, content_length)
    received = 0
    try:
        async for chunk in stream:
            if received + len(chunk) > content_length:
                raise MalformedInputError(f"the body is longer than its Content-Length ({content_length})")
            body[received : received + len(chunk)] = chunk
            received += len(chunk)
        if received != content_length:
            raise MalformedInputError(f"the body ended after {received} of {content_length} bytes")
    except BaseException:
        body.close()  # nothing has viewed it yet
        raise
    return body


def validate_params(spec: TransformSpec, raw: dict[str, Any], *, strict: bool = False) -> BaseModel:
    """``strict``: params from a JSON body, taken as JSON typed them; a query string's are text to convert."""
    try:
        return spec.params.model_validate(raw, strict=strict)
    except ValidationError as exc:
        errors = [
            {"loc": ".".join(str(p) for p in e["loc"]) or "params", "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        raise InvalidParamsError(f"invalid params for {spec.name}: {len(errors)} problem(s)", errors=errors) from exc


def params_from_query(spec: TransformSpec, items: Iterable[tuple[str, str]]) -> BaseModel:
    """Params of a ``.npy`` request, from its query string. List fields take ``a=1,2`` or ``a=1&a=2``."""
    values: dict[str, list[str]] = {}
    for key, value in items:
        values.setdefault(key, []).append(value)
    raw: dict[str, Any] = {}
    for key, given in values.items():
        field = spec.params.model_fields.get(key)
        if field is not None and _is_list(field.annotation):
            raw[key] = [part for value in given for part in value.split(",") if part != ""]
        elif len(given) > 1:
            raise InvalidParamsError(f"the parameter {key!r} is given {len(given)} times")
        else:
            raw[key] = given[0]
    return validate_params(spec, raw)


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (list, tuple):
        return True
    return any(typing.get_origin(arg) in (list, tuple) for arg in typing.get_args(annotation))


def check_layout(spec: TransformSpec, shape: tuple[int, ...], dtype: np.dtype[Any], settings: ComputeSettings) -> None:
    if dtype.name not in spec.dtypes:
        accepted = ", ".join(spec.dtypes)
        raise UnsupportedDtypeError(f"{spec.name} does not accept {dtype.name} data; it accepts {accepted}")
    if not spec.min_rank <= len(shape) <= spec.max_rank:
        raise UnsupportedRankError(
            f"{spec.name} takes arrays of {spec.min_rank} to {spec.max_rank} dimension(s), not {len(shape)}"
        )
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    limit = spec.element_limit(settings.max_elements)
    if count > limit:
        raise TooManyElementsError(f"{count} elements; {spec.name} takes at most {limit}")
    if count == 0:
        raise InvalidInputError("the array has no elements")


async def allocate(
    shape: tuple[int, ...], dtype: np.dtype[Any], fortran_order: bool, settings: ComputeSettings, stager: Stager
) -> StagedInput:
    """Room for the array: a reserved segment when it is large and /dev/shm can hold it, else gateway memory."""
    staged = StagedInput(shape, dtype, fortran_order)
    nbytes = staged.nbytes
    if stager.shm_enabled and nbytes >= settings.shm_threshold_bytes:
        if shm.free_bytes() >= nbytes:
            segment = shm.Segment(stager.namer.next(), nbytes)
            try:
                for start, length in segment.reserve_slices():
                    segment.reserve(start, length)
                    await asyncio.sleep(0)  # each slice zero-fills up to 4 MiB of pages: let others run between
            except shm.SegmentSpaceError:
                segment.close()
            except BaseException:
                segment.close()
                raise
            else:
                staged.segment = segment
                return staged
        stager.count_input_fallback()
        log.warning("/dev/shm cannot hold a %d-byte input; sending it through the pipe", nbytes)
    staged.inline = np.empty(shape, dtype=dtype, order="F" if fortran_order else "C")
    return staged


async def _finish_checks(staged: StagedInput, spec: TransformSpec, params: BaseModel) -> None:
    array = staged.array()
    try:
        if not spec.allow_nonfinite and array.dtype.kind == "f":
            flat = array.reshape(-1, order="A")
            for start in range(0, flat.size, FINITE_SLICE):
                block = flat[start : start + FINITE_SLICE]
                if not np.isfinite(block).all():
                    at = start + int(np.flatnonzero(~np.isfinite(block))[0])
                    raise NonFiniteDataError(f"{spec.name} does not accept NaN or infinity (element {at} is one)")
                await asyncio.sleep(0)
        if spec.check is not None:
            try:
                spec.check(array, params)
            except TransformInputError as exc:
                raise InvalidInputError(str(exc)) from exc
    finally:
        del array


async def stage_json(
    stream: AsyncIterator[bytes],
    spec: TransformSpec,
    settings: ComputeSettings,
    stager: Stager,
    *,
    content_length: int | None,
) -> tuple[StagedInput, BaseModel]:
    body = await read_body(stream, settings.max_body_bytes, content_length=content_length)
    try:
        request = await jsonarray.run_sliced(jsonarray.parse_request(body, max_rank=spec.max_rank))
        layout = request.data
        check_layout(spec, layout.shape, layout.dtype, settings)
        params = validate_params(spec, request.params, strict=True)
        staged = await allocate(layout.shape, layout.dtype, False, settings, stager)
        try:
            flat = staged.array().reshape(-1)
            try:
                await jsonarray.run_sliced(jsonarray.fill(body, layout, flat))
            finally:
                del flat
        except BaseException:
            discard(staged, stager)
            raise
    finally:
        # Dropped, not closed: the scan's arrays (and a traceback's frames) may still view it; it is unmapped
        # when the last of them goes, normally in the reaper thread.
        stager.dispose(drop=[body])
        del body
    try:
        await _finish_checks(staged, spec, params)
    except BaseException:
        discard(staged, stager)
        raise
    return staged, params


async def stage_npy(
    stream: AsyncIterator[bytes],
    spec: TransformSpec,
    params: BaseModel,
    settings: ComputeSettings,
    stager: Stager,
    *,
    content_length: int | None,
) -> StagedInput:
    limit = settings.max_body_bytes
    prefix = bytearray()
    header: npyfmt.NpyHeader | None = None
    staged: StagedInput | None = None
    target: memoryview | None = None
    written = received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLargeError(f"the body exceeds {limit} bytes")
            if header is None:
                prefix += chunk
                header_len = npyfmt.header_length(prefix)
                if header_len is None or len(prefix) < header_len:
                    continue
                header = npyfmt.parse_header(prefix[:header_len])
                _check_npy(spec, header, settings, content_length)
                staged = await allocate(header.shape, header.dtype, header.fortran_order, settings, stager)
                target = _byte_view(staged)
                chunk = bytes(prefix[header_len:])
            assert target is not None
            if written + len(chunk) > target.nbytes:
                raise MalformedInputError("the body is longer than its .npy header says")
            target[written : written + len(chunk)] = chunk
            written += len(chunk)
        if header is None or staged is None or target is None:
            raise MalformedInputError("the body is too short to hold a .npy header")
        if written != target.nbytes:
            raise MalformedInputError(f"the .npy body is cut short: {written} of {target.nbytes} data bytes")
        target.release()
        target = None
        await _finish_checks(staged, spec, params)
    except BaseException:
        if target is not None:
            target.release()
        if staged is not None:
            discard(staged, stager)
        raise
    return staged


def _check_npy(spec: TransformSpec, header: npyfmt.NpyHeader, settings: ComputeSettings, length: int | None) -> None:
    dtype = header.dtype
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise UnsupportedDtypeError(f"{spec.name} accepts plain numeric arrays, not {dtype}")
    if dtype.byteorder not in ("=", "|"):  # numpy writes the native order as '='; anything else is foreign
        raise UnsupportedDtypeError(f"send little-endian (native) data; this array is {dtype.str}")
    check_layout(spec, header.shape, np.dtype(dtype.name), settings)
    total = header.header_len + header.data_len
    if total > settings.max_body_bytes:
        raise PayloadTooLargeError(f"the array takes {total} bytes, more than {settings.max_body_bytes}")
    if length is not None and length != total:
        raise MalformedInputError(f"Content-Length is {length} but the .npy header describes {total} bytes")


def _byte_view(staged: StagedInput) -> memoryview:
    if staged.segment is not None:
        return staged.segment.view()[: staged.nbytes]
    assert staged.inline is not None
    # A Fortran-ordered array's bytes in file order are those of its transpose, which is C-contiguous.
    array = staged.inline if staged.inline.flags.c_contiguous else staged.inline.T
    return array.data.cast("B")

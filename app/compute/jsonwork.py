"""JSON work on large upstream bodies, done in a CPU worker so that the event loop only moves bytes.

orjson decodes object-heavy JSON at roughly 40 MB/s in one C call that never releases the GIL: a 6 MB body would
stall the loop (or, from a thread, everything else) for about 150 ms. In a worker the same work costs the loop
nothing. It runs as the internal transform ``json_digest`` (never listed or callable over HTTP): its input is the
body's bytes as a uint8 array, its result a uint8 array holding a small framed answer, so the gateway gets
already-encoded JSON fragments back and embeds them without parsing.

Frames: ``J`` + a JSON document; ``I`` + records of (key length, key, value length, value) for an object split by
key (u32 big-endian lengths); ``E`` + an error message.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict

from app.compute import npyfmt
from app.compute.registry import TransformSpec
from app.compute.wire import InlineArray, Job

if TYPE_CHECKING:
    from app.compute.pool import CpuPool

NAME = "json_digest"
_LEN = struct.Struct("!I")


class DigestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fields: list[str] | None = None
    split_keys: bool = False


def select(data: Any, fields: tuple[str, ...] | list[str] | None) -> Any:
    """Keep only ``fields`` of an object, or of each object in a list."""
    if fields is None:
        return data
    if isinstance(data, dict):
        return {k: data[k] for k in fields if k in data}
    if isinstance(data, list):
        return [select(item, fields) for item in data]
    return data


def digest(array: npt.NDArray[Any], params: DigestParams) -> npt.NDArray[np.uint8]:
    """Runs in a worker: validate the body as JSON, keep ``fields``, and frame the re-encoded result."""
    raw = array.tobytes()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _frame(b"E" + f"invalid JSON: {exc}".encode())
    if params.fields is not None:
        data = select(data, params.fields)
    if params.split_keys and isinstance(data, dict):
        parts = [b"I"]
        for key, value in data.items():
            encoded_key, encoded_value = str(key).encode(), orjson.dumps(value)
            parts += [_LEN.pack(len(encoded_key)), encoded_key, _LEN.pack(len(encoded_value)), encoded_value]
        return _frame(b"".join(parts))
    return _frame(b"J" + (raw if params.fields is None else orjson.dumps(data)))


def _frame(payload: bytes) -> npt.NDArray[np.uint8]:
    return np.frombuffer(payload, dtype=np.uint8)


def unframe(payload: bytes) -> tuple[str, Any]:
    """In the gateway: ("json", bytes), ("items", [(key, bytes), ...]) or ("error", message). No JSON parsing."""
    kind, body = payload[:1], memoryview(payload)[1:]
    if kind == b"J":
        return "json", bytes(body)
    if kind == b"E":
        return "error", bytes(body).decode(errors="replace")
    return "items", list(_records(body))


def _records(body: memoryview) -> Iterator[tuple[str, bytes]]:
    at = 0
    while at < len(body):
        (klen,) = _LEN.unpack_from(body, at)
        key = bytes(body[at + 4 : at + 4 + klen]).decode()
        at += 4 + klen
        (vlen,) = _LEN.unpack_from(body, at)
        yield key, bytes(body[at + 4 : at + 4 + vlen])
        at += 4 + vlen


JSON_DIGEST = TransformSpec(
    name=NAME,
    func=digest,
    description="Internal: validate, filter and frame a large upstream JSON body.",
    params=DigestParams,
    dtypes=("uint8",),
    min_rank=1,
    max_rank=1,
    result="array",
    internal=True,
)


async def digest_in_pool(
    pool: CpuPool, body: bytes, fields: tuple[str, ...] | None, *, split_keys: bool
) -> tuple[str, Any]:
    """Run ``json_digest`` on ``body`` in a worker; returns what unframe() returns.

    Raises what CpuPool.admit()/run() raise: OverloadedError (queue full), WorkerUnavailableError,
    WorkerCrashedError, TransformTimeoutError, TransformFailedError.
    """
    params = DigestParams(fields=list(fields) if fields is not None else None, split_keys=split_keys)
    job = Job(
        transform=NAME,
        params=params.model_dump(mode="json"),
        input=InlineArray(np.frombuffer(body, dtype=np.uint8)),
        output_format="npy",
    )
    with pool.admit(NAME) as admission:
        completed = await pool.run(job, admission)
    inline = completed.answer.inline
    assert inline is not None  # no output segment was offered, so the answer came through the pipe
    raw = bytes(inline.raw()) if isinstance(inline, pickle.PickleBuffer) else bytes(inline)
    start = npyfmt.header_length(raw)
    assert start is not None
    return unframe(raw[start:])

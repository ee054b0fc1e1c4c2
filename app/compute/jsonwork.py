"""The gateway side of ``json_digest`` (app/worker/jsondigest.py): large upstream JSON bodies validated and
filtered in a CPU worker, their answer unframed here without parsing any JSON.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np

from app.compute.pool import CpuPool
from app.worker import npyfmt
from app.worker.jsondigest import FRAME_LENGTH, NAME, DigestParams
from app.worker.wire import InlineArray, Job


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
        (klen,) = FRAME_LENGTH.unpack_from(body, at)
        key = bytes(body[at + 4 : at + 4 + klen]).decode()
        at += 4 + klen
        (vlen,) = FRAME_LENGTH.unpack_from(body, at)
        yield key, bytes(body[at + 4 : at + 4 + vlen])
        at += 4 + vlen


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

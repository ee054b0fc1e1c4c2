"""The internal transform ``json_digest``, run in a worker: JSON work on large upstream bodies, so that the
gateway's event loop only moves bytes (the gateway side is app/compute/jsonwork.py).

orjson decodes object-heavy JSON at roughly 40 MB/s in one C call that never releases the GIL: a 6 MB body would
stall the loop (or, from a thread, everything else) for about 150 ms. In a worker the same work costs the loop
nothing. It runs as the internal transform ``json_digest`` (never listed or callable over HTTP): its input is the
body's bytes as a uint8 array, its result a uint8 array holding a small framed answer, so the gateway gets
already-encoded JSON fragments back and embeds them without parsing.

Frames: ``J`` + a JSON document; ``I`` + records of (key length, key, value length, value) for an object split by
key (u32 big-endian lengths); ``E`` + an error message.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict

from app.worker.spec import TransformSpec

NAME = "json_digest"
FRAME_LENGTH = struct.Struct("!I")


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
            parts += [
                FRAME_LENGTH.pack(len(encoded_key)),
                encoded_key,
                FRAME_LENGTH.pack(len(encoded_value)),
                encoded_value,
            ]
        return _frame(b"".join(parts))
    return _frame(b"J" + (raw if params.fields is None else orjson.dumps(data)))


def _frame(payload: bytes) -> npt.NDArray[np.uint8]:
    return np.frombuffer(payload, dtype=np.uint8)


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

"""The answer side of a job, in the gateway: which format the client gets, and how large it can be.

A large answer travels back through a segment the gateway creates before the job (sparse: it costs nothing until
the worker reserves and writes what it needs). Its size must be known up front, so it is derived from the
transform's ``result_layout``: exact for ``.npy``, a safe upper bound for JSON (the longest float64 orjson writes
is 24 characters). Transforms without a layout, and object results, answer through the pipe.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from app.errors import NotAcceptableError
from app.worker import npyfmt
from app.worker.spec import TransformSpec
from app.worker.wire import OutputFormat

JSON_MEDIA_TYPE = "application/json"
NPY_MEDIA_TYPE = "application/x-npy"

_JSON_CHARS = {"f": 24, "i": 20, "u": 20, "b": 5}


def choose_format(request_format: OutputFormat, accept: str | None, spec: TransformSpec) -> OutputFormat:
    """The answer's format: the request's own unless ``Accept`` prefers the other; object results are JSON only.

    Raises NotAcceptableError when the client accepts none of the formats the transform can answer in.
    """
    if spec.result == "object":
        if accept is None or _quality(accept, JSON_MEDIA_TYPE) > (0.0, 0):
            return "json"
        raise NotAcceptableError(f"{spec.name} answers in {JSON_MEDIA_TYPE} only")
    if accept is None:
        return request_format
    json_q, npy_q = _quality(accept, JSON_MEDIA_TYPE), _quality(accept, NPY_MEDIA_TYPE)
    if json_q[0] <= 0 and npy_q[0] <= 0:
        raise NotAcceptableError(f"{spec.name} answers in {JSON_MEDIA_TYPE} or {NPY_MEDIA_TYPE}")
    if json_q == npy_q:
        return request_format
    return "json" if json_q > npy_q else "npy"


def _quality(accept: str, media_type: str) -> tuple[float, int]:
    """(q, specificity) of the best range in ``accept`` matching ``media_type``; (0, 0) when none does."""
    kind = media_type.split("/")[0]
    best = (0.0, 0)
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        media = parts[0].lower()
        q = 1.0
        for param in parts[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(media)
        if specificity is not None and q > 0:
            best = max(best, (q, specificity))
    return best


def answer_capacity(
    spec: TransformSpec, shape: tuple[int, ...], dtype: np.dtype[Any], params: BaseModel, fmt: OutputFormat
) -> int:
    """Bytes the encoded answer can take at most; 0 when unknown (the answer then comes through the pipe)."""
    if spec.result != "array" or spec.result_layout is None:
        return 0
    out_shape, out_dtype = spec.result_layout(shape, dtype, params)
    out_dtype = np.dtype(out_dtype)
    count = int(np.prod(out_shape, dtype=np.int64)) if out_shape else 1
    if fmt == "npy":
        return len(npyfmt.encode_header(tuple(out_shape), out_dtype)) + count * out_dtype.itemsize
    per_number = _JSON_CHARS.get(out_dtype.kind, 32)
    lists = sum(int(np.prod(out_shape[:k], dtype=np.int64)) for k in range(len(out_shape)))
    return len('{"result":}') + count * (per_number + 1) + lists * 3

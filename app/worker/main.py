"""The worker process: its main function, and the code that runs one job.

Top-level, importable, picklable, no import-time side effects. A worker is started by the pool (``worker_main``),
warms up, says ready, then serves jobs from its pipe one at a time until the pipe closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import ValidationError

from app.worker import npyfmt, shm
from app.worker.registry import Registry, load_registry
from app.worker.signals import leave_parent_process_group
from app.worker.spec import TransformInputError, TransformSpec
from app.worker.wire import Answer, InlineArray, Job, ShmArray, recv_message, send_message

NPY_MEDIA_TYPE = "application/x-npy"
JSON_MEDIA_TYPE = "application/json"


def init_worker() -> None:
    """Survive signals sent to the whole process group.

    Ctrl-C or ``tini -g`` signal every process of the group; a worker that died of it would drop a job the gateway
    is still draining. The gateway ends its workers itself: it closes their pipe, or sends SIGKILL.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # And out of the gateway's process group altogether (also unblocking what the fork server inherited blocked).
    leave_parent_process_group()


def worker_main(conn: Connection, plugin_refs: list[tuple[str, str]]) -> None:
    """The process's main function: warm up, say ready, then serve jobs until the gateway closes the pipe."""
    init_worker()
    registry = load_registry(plugin_refs)
    for spec in registry.values():
        if spec.warmup is not None:
            spec.warmup()
    try:
        send_message(conn, ("ready", os.getpid()))
        while True:
            _, job_id, job = recv_message(conn)[0]
            send_message(conn, ("started", job_id))
            send_message(conn, _reply(registry, job_id, job))
    except (EOFError, OSError):
        return  # the gateway closed the pipe (retirement), or is gone


def _reply(registry: Registry, job_id: int, job: Job) -> tuple[Any, ...]:
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        answer = run_job(registry, job)
    except TransformInputError as exc:
        return ("error", job_id, "input", str(exc))
    except _BadResult as exc:
        return ("error", job_id, "result", str(exc))
    except Exception as exc:  # the transform's own bug: reported, the worker lives on
        return ("error", job_id, "failed", f"{type(exc).__name__}: {exc}")
    timed = dataclasses.replace(answer, run_s=time.perf_counter() - started, cpu_s=time.process_time() - cpu_started)
    return ("done", job_id, timed)


class _BadResult(Exception):
    pass


@contextlib.contextmanager
def _input_array(ref: ShmArray | InlineArray) -> Iterator[npt.NDArray[Any]]:
    if isinstance(ref, InlineArray):
        yield ref.array
        return
    mapping, _ = shm.map_segment(ref.segment, writable=False)
    order: Literal["C", "F"] = "F" if ref.fortran_order else "C"
    # The array holds the mapping as its base: the mapping is unmapped when the last array on it goes, never
    # under one (closing an mmap does not wait for ndarrays made on it).
    yield np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=mapping, offset=ref.offset, order=order)


def run_job(registry: Registry, job: Job) -> Answer:
    spec = registry[job.transform]
    try:
        params = spec.params.model_validate(job.params)
    except ValidationError as exc:  # the gateway validated them already; this only guards a version skew
        raise TransformInputError(f"invalid params: {exc}") from exc
    with _input_array(job.input) as array:
        result = _checked(spec, array, params, spec.func(array, params))
        # Encoded while the input is mapped: a result may be a view of it.
        if job.output_format == "npy":
            return _answer_npy(job, result)
        return _answer_json(job, result)


def _checked(spec: TransformSpec, array: npt.NDArray[Any], params: Any, result: Any) -> Any:
    if spec.result == "object":
        if not isinstance(result, dict):
            raise _BadResult(f"transform {spec.name} returned {type(result).__name__}, not a mapping")
        return result
    if isinstance(result, np.generic):  # NumPy turns 0-d results into scalars
        result = np.asarray(result)
    if not isinstance(result, np.ndarray):
        raise _BadResult(f"transform {spec.name} returned {type(result).__name__}, not an ndarray")
    if result.dtype.kind not in "biuf":
        raise _BadResult(f"transform {spec.name} returned an array of {result.dtype}, not numbers")
    if spec.result_layout is not None:
        shape, dtype = spec.result_layout(array.shape, array.dtype, params)
        if result.shape != tuple(shape) or result.dtype != dtype:
            raise _BadResult(
                f"transform {spec.name} returned {result.dtype}{list(result.shape)}, "
                f"declared {np.dtype(dtype)}{list(shape)}"
            )
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-element one.
    return result if result.flags.c_contiguous else result.copy(order="C")


def _answer_npy(job: Job, result: npt.NDArray[Any]) -> Answer:
    header = npyfmt.encode_header(result.shape, result.dtype)
    length = len(header) + result.nbytes

    def write(target: mmap.mmap) -> None:
        target[: len(header)] = header
        np.copyto(np.ndarray(result.shape, dtype=result.dtype, buffer=target, offset=len(header)), result)

    if _to_segment(job, length, write):
        return Answer(NPY_MEDIA_TYPE, length, None)
    return Answer(NPY_MEDIA_TYPE, length, _inline(header + result.tobytes()), shm_fallback=_wanted_segment(job))


def _answer_json(job: Job, result: Any) -> Answer:
    if isinstance(result, np.ndarray) and result.ndim == 0:
        result = result.item()  # orjson writes a 0-d array as a one-element list
    try:
        body = orjson.dumps({"result": result}, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError as exc:
        raise _BadResult(f"the result cannot be encoded as JSON: {exc}") from exc

    def write(target: mmap.mmap) -> None:
        target[: len(body)] = body

    if _to_segment(job, len(body), write):
        return Answer(JSON_MEDIA_TYPE, len(body), None)
    return Answer(JSON_MEDIA_TYPE, len(body), _inline(body), shm_fallback=_wanted_segment(job))


def _inline(data: bytes) -> pickle.PickleBuffer:
    # Out of band: the bytes follow the pickle as a raw frame instead of being copied into it.
    return pickle.PickleBuffer(data)


def _wanted_segment(job: Job) -> bool:
    return job.output_segment is not None


def _to_segment(job: Job, length: int, write: Callable[[mmap.mmap], None]) -> bool:
    """Write the answer into the gateway's segment. False when there is none, or /dev/shm cannot back it."""
    if job.output_segment is None or length > job.output_capacity:
        return False
    try:
        # Reserve first: writing into a page tmpfs cannot back raises SIGBUS, which would kill this worker.
        shm.reserve_by_name(job.output_segment, length)
        mapping, _ = shm.map_segment(job.output_segment, writable=True)
    except (shm.SegmentSpaceError, FileNotFoundError):
        # Full /dev/shm: the answer comes back through the pipe instead. Gone: the gateway dropped the job.
        return False
    write(mapping)
    return True

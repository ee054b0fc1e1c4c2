"""POST /transform/{name} and GET /transform: CPU-bound transforms in the process pool.

A request is checked in full on the event loop (app/compute/staging.py) before its job is sent to a worker; a job's
answer is streamed to the client from the segment the worker wrote it into, or sent from the pipe's bytes.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.compute import answers, staging
from app.compute.pool import Completed, CpuPool
from app.errors import (
    ClientDisconnectedError,
    InvalidParamsError,
    MalformedInputError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
)
from app.responses import JSONResponse
from app.routes.disconnect import until_disconnected
from app.settings import ComputeSettings
from app.state import get_state
from app.worker import shm
from app.worker.spec import MAX_RANK
from app.worker.wire import Job, OutputFormat

router = APIRouter(tags=["transform"])

T = TypeVar("T")

STREAM_CHUNK = 1024 * 1024


@router.get("/transform")
async def list_transforms(request: Request) -> JSONResponse:
    state = get_state(request)
    pool, settings = state.require_cpu(), state.settings.compute
    return JSONResponse(
        {
            "transforms": [
                spec.describe(settings.max_elements) for spec in pool.registry.values() if not spec.internal
            ],
            "formats": [answers.JSON_MEDIA_TYPE, answers.NPY_MEDIA_TYPE],
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_elements": settings.max_elements,
                "shm_threshold_bytes": settings.shm_threshold_bytes,
                "job_timeout_s": settings.job_timeout_s,
                "queue_timeout_s": settings.queue_timeout_s,
            },
        }
    )


def _rank(rank: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for _ in range(rank):
        schema = {"type": "array", "minItems": 1, "items": schema}
    return schema


# The body is read by hand (streamed, size-checked, decoded in slices), so FastAPI is told its shape here: what
# app/compute/jsonarray.py takes, a number or lists nested to one depth (a transform declares at most 32), never
# null; params an object when present. JSON Schema cannot say "rectangular", nor what each transform accepts
# (GET /transform lists ranks, element types and each one's params schema): those refusals are 422s.
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "additionalProperties": False,
                "properties": {
                    "data": {
                        "description": "A number, or a rectangular nested list of numbers.",
                        "anyOf": [_rank(rank) for rank in range(MAX_RANK + 1)],
                    },
                    "params": {"type": "object", "description": "The transform's parameters (GET /transform)."},
                },
            },
            "example": {"data": [0.5, 1.0, 2.0], "params": {}},
        },
        "application/x-npy": {
            "schema": {"type": "string", "format": "binary", "description": "NumPy .npy; params in the query."}
        },
    },
}


# Every status this route answers besides the ones any route may (app/openapi.py adds those, and the problem body).
_TRANSFORM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": 'The result: JSON {"result": ...}, or a .npy file',
        "content": {"application/json": {"schema": {"type": "object"}}, "application/x-npy": {}},
    },
    404: {"description": "No such transform"},
    406: {"description": "No answer format the client accepts"},
    408: {"description": "The body did not arrive within compute.body_timeout_s"},
    415: {"description": "Neither application/json nor application/x-npy"},
    422: {"description": "Data or params the transform does not accept"},
    504: {"description": "The job overran compute.job_timeout_s; its worker was replaced"},
}


@router.post(
    "/transform/{name}",
    response_model=None,
    responses=_TRANSFORM_RESPONSES,
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def transform(
    name: Annotated[str, Path(description="A transform listed by GET /transform.", examples=["trig_log", "stats"])],
    request: Request,
) -> Response:
    state = get_state(request)
    pool, settings = state.require_cpu(), state.settings.compute
    spec = pool.registry.get(name)
    if spec is None or spec.internal:
        raise NotFoundError(f"unknown transform {name!r}; GET /transform lists the available ones")
    request_format = _request_format(request.headers.get("content-type"))
    answer_format = answers.choose_format(request_format, request.headers.get("accept"), spec)
    length = _content_length(request, settings)
    query_params = None
    if request_format == "npy":
        query_params = staging.params_from_query(spec, request.query_params.multi_items())
    elif request.query_params:
        raise InvalidParamsError("a JSON request carries its params in the body, not in the query string")

    with pool.admit(name) as admission:  # 503 + Retry-After at once when full; the place is ours until we leave
        try:
            stream = request.stream()
            async with asyncio.timeout(settings.body_timeout_s):
                if query_params is None:
                    staged, params = await staging.stage_json(stream, spec, settings, pool, content_length=length)
                else:
                    params = query_params
                    staged = await staging.stage_npy(stream, spec, params, settings, pool, content_length=length)
        except ClientDisconnect:
            raise ClientDisconnectedError("the client disconnected while sending the body") from None
        except TimeoutError as exc:
            raise RequestTimeoutError(f"the body did not arrive within {settings.body_timeout_s:g} s") from exc
        output: shm.Segment | None = None
        try:
            capacity = answers.answer_capacity(spec, staged.shape, staged.dtype, params, answer_format)
            if pool.shm_enabled and capacity >= settings.shm_threshold_bytes:
                # Sparse until the worker reserves what it writes: creating it costs no memory.
                output = shm.Segment(pool.namer.next(), capacity)
            job = Job(
                transform=name,
                params=params.model_dump(mode="json"),
                input=staged.ref(),
                output_format=answer_format,
                output_segment=output.name if output is not None else None,
                output_capacity=capacity if output is not None else 0,
            )
            # Awaiting the job holds an input segment and maybe an output one: both are unlinked in the
            # finally below on every path, and the pool itself kills the worker if this await is cancelled.
            completed = await until_disconnected(
                request.scope, request.receive, pool.run(job, admission), what="the job finished"
            )
        except BaseException:
            if output is not None:
                output.unlink()
                pool.dispose(close=[output])
            raise
        finally:
            staging.discard(staged, pool)
            if output is not None:
                output.unlink()  # the name goes now; the mapping stays for the answer below
    return _answer(completed, output, pool)


def _request_format(content_type: str | None) -> OutputFormat:
    media = (content_type or "").split(";")[0].strip().lower()
    if media == answers.JSON_MEDIA_TYPE:
        return "json"
    if media == answers.NPY_MEDIA_TYPE:
        return "npy"
    raise UnsupportedMediaTypeError(
        f"send {answers.JSON_MEDIA_TYPE} or {answers.NPY_MEDIA_TYPE}, not {media or 'a body without Content-Type'}"
    )


def _content_length(request: Request, settings: ComputeSettings) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        length = int(raw)
    except ValueError as exc:
        raise MalformedInputError(f"invalid Content-Length {raw!r}") from exc
    if length > settings.max_body_bytes:
        raise PayloadTooLargeError(f"the body is {length} bytes; transforms take at most {settings.max_body_bytes}")
    return length


def _answer(completed: Completed, output: shm.Segment | None, pool: CpuPool) -> Response:
    answer = completed.answer
    if answer.inline is not None:
        if output is not None:
            pool.dispose(close=[output])
        inline = memoryview(answer.inline)
        if inline.nbytes <= STREAM_CHUNK:
            return Response(content=bytes(inline), media_type=answer.media_type)
        # A large answer that came through the pipe (/dev/shm was full): streamed too, not written in one piece.
        return StreamedAnswer(inline, answer.media_type, pool)
    assert output is not None
    return StreamedAnswer(output.view()[: answer.length], answer.media_type, pool, segment=output)


class StreamedAnswer(Response):
    """Sends an answer in 1 MiB slices (uvicorn's flow control paces them), from its already unlinked segment or
    from the pipe's bytes; then hands the memory to the reaper."""

    def __init__(self, view: memoryview, media_type: str, pool: CpuPool, *, segment: shm.Segment | None = None):
        super().__init__(content=None, media_type=media_type)
        self._view = view
        self._pool = pool
        self._segment = segment
        self.headers["content-length"] = str(view.nbytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        view = self._view
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for start in range(0, view.nbytes, STREAM_CHUNK):
                with view[start : start + STREAM_CHUNK] as piece:
                    chunk = bytes(piece)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            backing = view.obj  # the mmap or the bytes: its last reference goes in the reaper thread
            view.release()
            del view
            self._pool.dispose(close=[self._segment] if self._segment is not None else [], drop=[backing])

"""POST /transform/{name}: CPU-bound work in the process pool."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.compute.transforms import run_trig_log
from app.errors import NotFoundError, TooManyElementsError
from app.responses import JSONResponse
from app.state import get_state

router = APIRouter(tags=["transform"])

TRANSFORMS = {"trig_log": "element-wise sin(x) * cos(x) + log1p(|x|), float64"}


class TransformRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: float | list[float] = Field(description="A number or a list of numbers.")
    params: dict[str, Any] = Field(default_factory=dict)


class TransformInfo(BaseModel):
    name: str
    description: str


class TransformList(BaseModel):
    transforms: list[TransformInfo]


class TransformResult(BaseModel):
    result: float | list[float]


@router.get("/transform", response_model=None, responses={200: {"model": TransformList}})
async def list_transforms() -> JSONResponse:
    return JSONResponse({"transforms": [{"name": k, "description": v} for k, v in TRANSFORMS.items()]})


@router.post(
    "/transform/{name}",
    response_model=None,
    responses={200: {"model": TransformResult}, 404: {"description": "No such transform"}},
)
async def transform(name: str, body: TransformRequest, request: Request) -> JSONResponse:
    if name not in TRANSFORMS:
        raise NotFoundError(f"unknown transform '{name}'")
    state = get_state(request)
    limit = state.settings.limits.max_transform_elements
    if isinstance(body.data, list) and len(body.data) > limit:
        raise TooManyElementsError(f"at most {limit} elements per transform input")
    result = await state.require_cpu().run(run_trig_log, body.data)
    return JSONResponse({"result": result})

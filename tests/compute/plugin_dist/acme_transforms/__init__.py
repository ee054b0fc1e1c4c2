"""A third-party transform package, installed for the tests as a real distribution (see the .dist-info beside).

``moving_average`` is the README's worked example, word for word. The others exist to drive the gateway's
failure paths through a real worker: a transform that sleeps, raises, refuses its input, or returns a result
that does not match its declared layout.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from app.worker import TransformInputError, TransformSpec


class MovingAverageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(3, ge=1, le=10_000, description="Elements averaged per output value.")


def moving_average(x: npt.NDArray[Any], params: MovingAverageParams) -> npt.NDArray[np.float64]:
    if params.window > x.shape[-1]:
        raise TransformInputError(f"window {params.window} is longer than the data ({x.shape[-1]})")
    kernel = np.full(params.window, 1.0 / params.window)
    return np.convolve(x.astype(np.float64), kernel, mode="valid")


def _moving_average_layout(shape: tuple[int, ...], dtype: np.dtype[Any], params: MovingAverageParams) -> Any:
    return (shape[0] - params.window + 1,), np.dtype(np.float64)


MOVING_AVERAGE = TransformSpec(
    name="moving_average",
    func=moving_average,
    description="Simple moving average over a window (valid positions only).",
    params=MovingAverageParams,
    min_rank=1,
    max_rank=1,
    result_layout=_moving_average_layout,
)


class SleepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ms: int = Field(0, ge=0, le=600_000)


def sleep(x: npt.NDArray[Any], params: SleepParams) -> npt.NDArray[Any]:
    time.sleep(params.ms / 1000)
    return np.array(x, copy=True)


def _same(shape: tuple[int, ...], dtype: np.dtype[Any], params: Any) -> Any:
    return shape, dtype


SLEEP = TransformSpec(
    name="sleep", func=sleep, description="Sleeps, then echoes its input.", params=SleepParams, result_layout=_same
)


def boom(x: npt.NDArray[Any], params: Any) -> Any:
    raise RuntimeError("boom")


BOOM = TransformSpec(name="boom", func=boom, description="Always raises.")


def bad_shape(x: npt.NDArray[Any], params: Any) -> Any:
    return np.zeros(x.size + 1)


BAD_SHAPE = TransformSpec(
    name="bad_shape", func=bad_shape, description="Returns one element too many.", result_layout=_same
)


def refuse(x: npt.NDArray[Any], params: Any) -> Any:
    raise TransformInputError("these values are refused while running")


REFUSE = TransformSpec(name="refuse", func=refuse, description="Refuses any input, in the worker.")

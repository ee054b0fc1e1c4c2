"""Built-in transforms. Their functions run in worker processes: top-level, picklable, no import-time side effects.

Inputs arrive already checked against the spec (element type, rank, element count, NaN/inf policy, params), and
read-only: a transform returns new arrays and never writes into its input.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from app.worker.spec import INTEGER_DTYPES, NoParams, Shape, TransformInputError, TransformSpec

PRIME_COUNT_MAX_N = 50_000_000


def _same_shape_float64(shape: Shape, dtype: np.dtype[Any], params: Any) -> tuple[Shape, np.dtype[Any]]:
    return shape, np.dtype(np.float64)


def _same_layout(shape: Shape, dtype: np.dtype[Any], params: Any) -> tuple[Shape, np.dtype[Any]]:
    return shape, dtype


def _same_shape_int64(shape: Shape, dtype: np.dtype[Any], params: Any) -> tuple[Shape, np.dtype[Any]]:
    return shape, np.dtype(np.int64)


def _check_axis(axis: int | None, ndim: int) -> None:
    if axis is not None and not -ndim <= axis < ndim:
        raise TransformInputError(f"axis {axis} is out of range for an array of {ndim} dimension(s)")


# trig_log ----------------------------------------------------------------------------------------------------------


def trig_log(x: npt.NDArray[Any], params: NoParams) -> npt.NDArray[np.float64]:
    v = x.astype(np.float64, copy=False)
    result: npt.NDArray[np.float64] = np.sin(v) * np.cos(v) + np.log1p(np.abs(v))
    return result


# stats -------------------------------------------------------------------------------------------------------------


class StatsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    axis: int | None = Field(None, description="Reduce along this axis only; all elements when absent.")
    percentiles: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=list, max_length=32, description="Percentiles to report, each in [0, 100]."
    )
    ddof: int = Field(0, ge=0, le=1, description="Delta degrees of freedom of the standard deviation.")


def _check_stats(x: npt.NDArray[Any], params: StatsParams) -> None:
    _check_axis(params.axis, x.ndim)
    count = x.size if params.axis is None else x.shape[params.axis]
    if count <= params.ddof:
        raise TransformInputError(f"stats needs more than {params.ddof} element(s) along the reduced axis")


def _percentile_key(q: float) -> str:
    return f"{q:g}"


def stats(x: npt.NDArray[Any], params: StatsParams) -> dict[str, Any]:
    v = x.astype(np.float64, copy=False)
    axis = params.axis
    out: dict[str, Any] = {
        "count": int(v.size if axis is None else v.shape[axis]),
        "mean": np.mean(v, axis=axis),
        "std": np.std(v, axis=axis, ddof=params.ddof),
        "min": np.min(v, axis=axis),
        "max": np.max(v, axis=axis),
    }
    if params.percentiles:
        values = np.percentile(v, params.percentiles, axis=axis)
        out["percentiles"] = {_percentile_key(q): values[i] for i, q in enumerate(params.percentiles)}
    return out


# sort --------------------------------------------------------------------------------------------------------------


class SortParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    axis: int = Field(-1, description="The axis to sort along.")
    descending: bool = Field(False, description="Largest first (NaN first, as the reverse of ascending order).")
    stable: bool = Field(False, description="Keep the order of equal elements.")


def _check_sort(x: npt.NDArray[Any], params: SortParams) -> None:
    _check_axis(params.axis, x.ndim)


def sort(x: npt.NDArray[Any], params: SortParams) -> npt.NDArray[Any]:
    result: npt.NDArray[Any] = np.sort(x, axis=params.axis, kind="stable" if params.stable else None)
    if params.descending:
        result = np.flip(result, axis=params.axis)
    return result


# prime_count: pure Python, holds the GIL ---------------------------------------------------------------------------


def _check_prime_count(x: npt.NDArray[Any], params: NoParams) -> None:
    if x.size and (int(x.min()) < 0 or int(x.max()) > PRIME_COUNT_MAX_N):
        raise TransformInputError(f"prime_count takes integers in [0, {PRIME_COUNT_MAX_N}]")


def _sieve(limit: int) -> bytearray:
    # Deliberately plain Python loops: this is the work a thread pool cannot spread over cores, because it holds
    # the GIL from start to end. Worker processes each have their own.
    flags = bytearray([1]) * (limit + 1)
    flags[0] = 0
    if limit >= 1:
        flags[1] = 0
    p = 2
    while p * p <= limit:
        if flags[p]:
            for multiple in range(p * p, limit + 1, p):
                flags[multiple] = 0
        p += 1
    return flags


def prime_count(x: npt.NDArray[Any], params: NoParams) -> npt.NDArray[np.int64]:
    """π(n) for every element n: how many primes are ≤ n (one sieve up to the largest n)."""
    values = x.astype(np.int64, copy=False)
    out = np.zeros(values.shape, dtype=np.int64)
    if values.size == 0:
        return out
    flags = _sieve(int(values.max()))
    order = np.argsort(values, axis=None, kind="stable")
    flat = values.reshape(-1)
    counts = out.reshape(-1)
    running, upto = 0, -1
    for index in order.tolist():
        n = int(flat[index])
        if n > upto:
            running += flags.count(1, upto + 1, n + 1)
            upto = n
        counts[index] = running
    return out


def _warm_numpy() -> None:
    sample = np.linspace(-2.0, 2.0, 64)
    trig_log(sample, NoParams())
    stats(sample, StatsParams(percentiles=[50]))
    sort(sample, SortParams())


BUILTINS = (
    TransformSpec(
        name="trig_log",
        func=trig_log,
        description="Element-wise sin(x) * cos(x) + log1p(|x|), computed in float64.",
        min_rank=0,
        max_rank=8,
        result="array",
        result_layout=_same_shape_float64,
        warmup=_warm_numpy,
    ),
    TransformSpec(
        name="stats",
        func=stats,
        description="Count, mean, standard deviation, min, max and requested percentiles, overall or per axis.",
        params=StatsParams,
        min_rank=1,
        max_rank=8,
        result="object",
        check=_check_stats,
    ),
    TransformSpec(
        name="sort",
        func=sort,
        description="Sort along an axis, ascending or descending; NaN sorts last (first when descending).",
        params=SortParams,
        min_rank=1,
        max_rank=8,
        allow_nonfinite=True,
        result="array",
        result_layout=_same_layout,
        check=_check_sort,
    ),
    TransformSpec(
        name="prime_count",
        func=prime_count,
        description=(
            "For every integer n in [0, 50000000], the number of primes <= n. A pure-Python sieve that holds the "
            "GIL: the reason transforms run in processes, not threads."
        ),
        dtypes=INTEGER_DTYPES,
        min_rank=0,
        max_rank=1,
        max_elements=100_000,
        result="array",
        result_layout=_same_shape_int64,
        check=_check_prime_count,
    ),
)

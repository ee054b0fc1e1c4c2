"""Built-in transforms. Functions here run in worker processes: top-level and picklable."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def trig_log(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = np.sin(x) * np.cos(x) + np.log1p(np.abs(x))
    return result


def run_trig_log(values: list[float] | float) -> list[float] | float:
    out: list[float] | float = trig_log(np.asarray(values, dtype=np.float64)).tolist()
    return out

"""Medians with spread, over rounds; ratios are taken round by round (A and B measured back to back) first."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TypedDict


class Spread(TypedDict):
    median: float
    min: float
    max: float
    n: int


def spread(values: Sequence[float]) -> Spread | None:
    clean = [v for v in values if v == v]  # drop NaN
    if not clean:
        return None
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "n": len(clean)}


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Spread | None:
    """a[i] / b[i] for each round where both were measured, then the median and range of those ratios."""
    return spread([x / y for x, y in zip(a, b, strict=False) if x is not None and y is not None and y > 0])


def fmt_spread(s: Spread | None, fmt: str = "{:.0f}") -> str:
    if s is None:
        return "n/a"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept); None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    fit = statistics.linear_regression(xs, ys)
    return fit.slope, fit.intercept

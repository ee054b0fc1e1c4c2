"""Read the gateway's Prometheus text exposition: samples, histogram deltas between two scrapes, quantiles."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        name, _, labels, value = match.groups()
        key = tuple(sorted(_LABEL.findall(labels or "")))
        try:
            samples[(name, key)] = float(value)
        except ValueError:
            continue
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample named ``name`` whose labels include ``labels``, summed when several match."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    return sum(found) if found else None


def total(samples: Samples, name: str, exclude: Mapping[str, str] | None = None) -> float:
    """Sum of every sample named ``name``, except those carrying any of the ``exclude`` label values."""
    skip = set((exclude or {}).items())
    return sum(v for (n, ls), v in samples.items() if n == name and not (skip & set(ls)))


def histogram_delta(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of ``name``'s buckets, after minus before, sorted by bound."""
    buckets: dict[float, float] = {}
    for (n, ls), v in after.items():
        if n != f"{name}_bucket":
            continue
        le = dict(ls).get("le")
        if le is None:
            continue
        bound = math.inf if le == "+Inf" else float(le)
        buckets[bound] = buckets.get(bound, 0.0) + v - before.get((n, ls), 0.0)
    return sorted(buckets.items())


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket that holds the q-th observation.
    None when nothing was observed. A quantile in the +Inf bucket returns the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound

"""What a transform declares: ``TransformSpec``, the public surface third-party transforms are written against
(import it from ``app.worker``).

A transform is a top-level function that runs in a worker process, plus the declarations the gateway checks
*before* any input reaches a worker (element types, ranks, element limit, NaN/inf policy, a params model, optional
value checks).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

NUMERIC_DTYPES = (
    "float64",
    "float32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
)
INTEGER_DTYPES = tuple(d for d in NUMERIC_DTYPES if "int" in d)
MAX_RANK = 32  # what any transform may declare

Shape = tuple[int, ...]
TransformFn = Callable[[npt.NDArray[Any], Any], Any]
ResultLayout = Callable[[Shape, np.dtype[Any], Any], tuple[Shape, np.dtype[Any]]]
InputCheck = Callable[[npt.NDArray[Any], Any], None]


class TransformInputError(ValueError):
    """Raised by a transform (or its ``check``) for values it refuses; answered 422 with the message."""


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransformDefinitionError(Exception):
    """A transform, or an entry point naming one, is not a usable TransformSpec."""


@dataclass(frozen=True, kw_only=True)
class TransformSpec:
    """One transform.

    ``func(array, params)`` runs in a worker and returns an ndarray (``result="array"``) or a JSON-able mapping
    (``result="object"``). It must be a top-level function of an importable module, with no import-time side effects.

    ``result_layout(shape, dtype, params)`` gives the shape and dtype of an array result; with it the gateway sizes a
    shared-memory segment for large answers (without it, answers come back through the pipe) and checks what the
    function returned. ``check(array, params)`` runs in the gateway on the staged input, before any worker sees it:
    keep it vectorised and cheap, and raise TransformInputError.
    """

    name: str
    func: TransformFn
    description: str
    params: type[BaseModel] = NoParams
    dtypes: tuple[str, ...] = NUMERIC_DTYPES
    min_rank: int = 0
    max_rank: int = 8
    max_elements: int | None = None
    allow_nonfinite: bool = False
    result: Literal["array", "object"] = "array"
    result_layout: ResultLayout | None = None
    check: InputCheck | None = None
    # Called once in every new worker before it reports ready, so the first request pays no warm-up.
    warmup: Callable[[], None] | None = field(default=None, repr=False)
    # The gateway's own work (e.g. decoding large upstream JSON): never listed, never callable over HTTP.
    internal: bool = False

    def validate_definition(self) -> None:
        """Raises TransformDefinitionError naming what is wrong."""
        if not NAME_PATTERN.match(self.name):
            raise TransformDefinitionError(f"transform name {self.name!r} must match {NAME_PATTERN.pattern}")
        if not callable(self.func):
            raise TransformDefinitionError(f"transform {self.name}: func is not callable")
        if not (isinstance(self.params, type) and issubclass(self.params, BaseModel)):
            raise TransformDefinitionError(f"transform {self.name}: params must be a pydantic model class")
        if not 0 <= self.min_rank <= self.max_rank <= MAX_RANK:
            raise TransformDefinitionError(f"transform {self.name}: ranks must satisfy 0 <= min <= max <= {MAX_RANK}")
        for name in self.dtypes:
            if name not in NUMERIC_DTYPES and name != "bool":
                raise TransformDefinitionError(f"transform {self.name}: unsupported dtype {name!r}")
        if self.result not in ("array", "object"):
            raise TransformDefinitionError(f"transform {self.name}: result must be 'array' or 'object'")

    def element_limit(self, gateway_limit: int) -> int:
        return gateway_limit if self.max_elements is None else min(self.max_elements, gateway_limit)

    def describe(self, gateway_limit: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "dtypes": list(self.dtypes),
            "ranks": {"min": self.min_rank, "max": self.max_rank},
            "max_elements": self.element_limit(gateway_limit),
            "nonfinite": "allowed" if self.allow_nonfinite else "rejected",
            "result": self.result,
            "formats": ["json", "npy"] if self.result == "array" else ["json"],
            "params": self.params.model_json_schema(),
        }

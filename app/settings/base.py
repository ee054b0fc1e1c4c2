"""What every settings section shares: strict, frozen models, and the small types their fields use."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")]
ParamType = Literal["int", "float", "str", "bool"]
PositiveMs = Annotated[float, Field(gt=0, le=3_600_000)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

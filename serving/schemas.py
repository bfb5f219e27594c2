"""The JSON bodies the service answers with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["RleMask", "PredictResponse", "LiveResponse", "ReadyResponse", "NotReadyResponse", "ErrorResponse"]


class RleMask(BaseModel):
    """A binary mask as run lengths (see :mod:`serving.rle`)."""

    shape: list[int] = Field(description="[slices, rows, cols] of the uploaded series")
    encoding: Literal["rle"] = "rle"
    rle: list[int] = Field(
        description="alternating run lengths of 0s and 1s over the C-order flattened mask, "
        "starting with 0s (the first run is 0 when the mask starts with 1)"
    )


class PredictResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    model_version: int
    series_instance_uid: str
    score: float = Field(ge=0.0, le=1.0, description="probability that the series holds a lesion")
    status: Literal["suspect", "normal"]
    mask: RleMask


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    status: Literal["ready"] = "ready"
    model_uri: str
    model_name: str
    model_version: int


class NotReadyResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    status: Literal["not ready"] = "not ready"
    model_uri: str
    detail: str


class ErrorResponse(BaseModel):
    detail: str

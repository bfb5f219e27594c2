"""The JSON bodies the service answers with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["RleMask", "StoredSeg", "PredictResponse", "LiveResponse", "ReadyResponse", "NotReadyResponse", "ErrorResponse"]


class RleMask(BaseModel):
    """A binary mask as run lengths (see :mod:`serving.rle`)."""

    shape: list[int] = Field(description="[slices, rows, cols] of the uploaded series")
    encoding: Literal["rle"] = "rle"
    rle: list[int] = Field(
        description="alternating run lengths of 0s and 1s over the C-order flattened mask, "
        "starting with 0s (the first run is 0 when the mask starts with 1)"
    )


class StoredSeg(BaseModel):
    """A DICOM SEG stored in the PACS by STOW-RS (``?store=true``)."""

    url: str = Field(description="the STOW-RS endpoint that accepted it")
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


class PredictResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    model_version: int
    series_instance_uid: str
    score: float = Field(ge=0.0, le=1.0, description="probability that the series holds a lesion")
    status: Literal["suspect", "normal"]
    mask: RleMask
    stored: StoredSeg | None = Field(
        default=None, description="the SEG stored in the PACS, with ?store=true"
    )


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

"""Helpers for the serving security tests: a tiny in-memory model, a series as upload parts, keys."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import torch
from fastapi import FastAPI

from imaging.dicom_write import write_series
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry.load import LoadedModel
from serving import ServingSettings, create_app
from serving.security import ApiKeyStore

SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
URI = "models:/sec@champion"
PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "PID-4711"

Part = tuple[str, tuple[str, bytes, str]]


def tiny_model(version: int = 7) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(name="sec", version=version, spec=SPEC, state_dict=build_unet(SPEC).state_dict())


def make_app(**settings: object) -> FastAPI:
    """An app serving :func:`tiny_model` (auth as given; default the settings' default)."""
    model = tiny_model()
    return create_app(ServingSettings(model_uri=URI, device="cpu", **settings), loader=lambda uri: model)


def write_tiny_series(out: Path, seed: str, shape: tuple[int, int, int] = (2, 24, 24)) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    return write_series(out / seed, rng.integers(0, 1000, size=shape), patient_id=PATIENT_ID,
                        patient_name=PATIENT_NAME, uid_seed=seed, modality="MR",
                        spacing=(2.0, 0.8, 0.8))


def parts(paths: list[Path]) -> list[Part]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


def dataset_bytes(ds: pydicom.Dataset, *, file_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=file_format)
    return buffer.getvalue()


def new_key(name: str, scopes: str) -> str:
    """Create a key in the default store (``$FEDSEG_HOME/serving/apikeys.json``)."""
    return ApiKeyStore().create(name, scopes)[1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}

"""MONAI preprocessing of a series into network input, and its inverse for the outputs.

A series ``(slices, rows, cols)`` is treated channel-first by MONAI, so every 2-D transform
acts on each slice alike: intensities are windowed per series to [0, 1] by percentiles (robust
to scanner offsets and scales), then slices are resized to ``image_size``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRangePercentiles

from .errors import DataError
from .spec import ModelSpec

__all__ = ["preprocess_image", "preprocess_mask", "restore_probabilities"]


def _as_stack(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 3 or min(array.shape) < 1:
        raise DataError(f"{what} must be a non-empty (slices, rows, cols) array, got {array.shape}")
    return array


def preprocess_image(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Series pixels ``(slices, rows, cols)`` -> float32 ``(slices, S, S)`` in [0, 1]."""
    pixels = _as_stack(np.asarray(pixels, dtype=np.float32), "image")
    if not np.isfinite(pixels).all():
        raise DataError("image contains NaN or infinite values")
    transform = Compose(
        [
            ScaleIntensityRangePercentiles(
                lower=spec.lower_percentile,
                upper=spec.upper_percentile,
                b_min=0.0,
                b_max=1.0,
                clip=True,
            ),
            Resize((spec.image_size, spec.image_size), mode="area"),
        ]
    )
    out = transform(torch.from_numpy(pixels))
    return np.asarray(out, dtype=np.float32)


def preprocess_mask(mask: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Label mask ``(slices, rows, cols)`` -> uint8 ``(slices, S, S)`` by nearest neighbour."""
    mask = _as_stack(np.asarray(mask), "mask")
    resize = Resize((spec.image_size, spec.image_size), mode="nearest")
    out = resize(torch.from_numpy((mask > 0).astype(np.float32)))
    return (np.asarray(out) > 0.5).astype(np.uint8)


def restore_probabilities(probs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Network probabilities ``(slices, S, S)`` -> ``(slices, rows, cols)``, the input's geometry."""
    probs = _as_stack(np.asarray(probs, dtype=np.float32), "probabilities")
    resize = Resize((rows, cols), mode="bilinear", align_corners=False)
    return np.clip(np.asarray(resize(torch.from_numpy(probs)), dtype=np.float32), 0.0, 1.0)

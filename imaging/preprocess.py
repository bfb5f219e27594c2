"""Preprocessing of a series into network input, and its inverse for the outputs.

A series ``(slices, rows, cols)`` is treated channel-first, so every 2-D operation acts on each
slice alike: intensities are windowed per series to [0, 1] by percentiles (robust to scanner
offsets and scales), then slices are resized to ``image_size`` by area averaging.

This is the one implementation that training (:mod:`imaging.site_data`) and serving
(:mod:`serving.predictor`) share. It computes what MONAI's
``Compose([ScaleIntensityRangePercentiles(lower, upper, 0, 1, clip=True),
Resize((S, S), mode="area")])`` computes (the original implementation; the tests keep them equal
within float tolerance), but on the whole stack at once with plain numpy and torch: both
percentiles from two single-rank selections instead of two full ``np.percentile`` calls, and no
MetaTensor bookkeeping. That takes a 16 x 256 x 256 series from about 22 ms to about 4 ms on two
CPU cores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError
from .spec import ModelSpec

__all__ = [
    "intensity_window",
    "preprocess_image",
    "preprocess_mask",
    "restore_probabilities",
    "stack_percentiles",
]


def _as_stack(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 3 or min(array.shape) < 1:
        raise DataError(f"{what} must be a non-empty (slices, rows, cols) array, got {array.shape}")
    return array


def _rank(q: float, n: int) -> tuple[int, float]:
    """numpy's ``linear`` method: the rank below percentile ``q`` of ``n`` values, and the weight
    of the next rank."""
    virtual = (float(q) / 100.0) * (n - 1)
    below = min(int(np.floor(virtual)), n - 1)
    return below, virtual - below


def stack_percentiles(values: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles of all of (finite) ``values``, numpy's linear method.

    Equal to ``np.percentile(values, [lower, upper])`` within float rounding, but from two
    single-rank selections (about 1.5 ms for a million voxels) instead of a multi-rank one
    (about 11 ms).
    """
    flat = np.asarray(values).reshape(-1)
    n = flat.size
    if n == 0:
        raise DataError("cannot take percentiles of an empty array")
    if not 0 <= lower <= upper <= 100:
        raise ValueError(f"need 0 <= lower <= upper <= 100, got {lower}, {upper}")
    lo_rank, lo_w = _rank(lower, n)
    hi_rank, hi_w = _rank(upper, n)
    part = np.partition(flat, lo_rank)  # part[:lo_rank] <= part[lo_rank] <= part[lo_rank + 1:]
    above = part[lo_rank + 1 :]
    lo_a = float(part[lo_rank])
    lo_b = float(above.min()) if lo_w > 0 and above.size else lo_a
    if hi_rank == lo_rank:
        hi_a, hi_b = lo_a, (lo_b if hi_w > 0 else lo_a)
    else:  # rank hi_rank of flat is rank k of ``above``
        k = hi_rank - lo_rank - 1
        sel = np.partition(above, k)
        hi_a = float(sel[k])
        hi_b = float(sel[k + 1 :].min()) if hi_w > 0 and k + 1 < sel.size else hi_a
    return _lerp(lo_a, lo_b, lo_w), _lerp(hi_a, hi_b, hi_w)


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's interpolation between neighbouring ranks (exact at both ends)."""
    if t == 0:
        return a
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def intensity_window(pixels: np.ndarray, lower: float, upper: float) -> torch.Tensor:
    """``pixels`` (float32) windowed to [0, 1] between its ``lower`` and ``upper`` percentiles.

    A new float32 tensor (``pixels`` is not modified). As MONAI's ScaleIntensityRange: when both
    percentiles are equal, the values are only shifted by that value (not scaled, not clipped).
    """
    a_min, a_max = stack_percentiles(pixels, lower, upper)
    a_min32 = torch.tensor(a_min, dtype=torch.float32)  # MONAI computes in the input's dtype
    width = torch.tensor(a_max, dtype=torch.float32) - a_min32
    out = torch.from_numpy(pixels) - a_min32
    if width == 0:
        return out
    return out.div_(width).clamp_(0.0, 1.0)


def preprocess_image(pixels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Series pixels ``(slices, rows, cols)`` -> float32 ``(slices, S, S)`` in [0, 1]."""
    pixels = _as_stack(np.ascontiguousarray(pixels, dtype=np.float32), "image")
    if not np.isfinite(pixels).all():
        raise DataError("image contains NaN or infinite values")
    size = (spec.image_size, spec.image_size)
    with torch.inference_mode():
        x = intensity_window(pixels, spec.lower_percentile, spec.upper_percentile)
        if tuple(x.shape[1:]) != size:
            x = F.interpolate(x.unsqueeze(0), size=size, mode="area").squeeze(0)
        return x.numpy()


def preprocess_mask(mask: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Label mask ``(slices, rows, cols)`` -> uint8 ``(slices, S, S)`` by nearest neighbour."""
    mask = _as_stack(np.asarray(mask), "mask")
    size = (spec.image_size, spec.image_size)
    x = torch.from_numpy((mask > 0).astype(np.float32))
    if tuple(x.shape[1:]) != size:
        with torch.inference_mode():
            x = F.interpolate(x.unsqueeze(0), size=size, mode="nearest").squeeze(0)
    return (x.numpy() > 0.5).astype(np.uint8)


def restore_probabilities(probs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Network probabilities ``(slices, S, S)`` -> ``(slices, rows, cols)``, the input's geometry."""
    probs = _as_stack(np.ascontiguousarray(probs, dtype=np.float32), "probabilities")
    with torch.inference_mode():
        x = torch.from_numpy(probs)
        if tuple(x.shape[1:]) != (rows, cols):
            x = F.interpolate(x.unsqueeze(0), size=(rows, cols), mode="bilinear",
                              align_corners=False).squeeze(0)
        else:
            x = x.clone()
        return x.clamp_(0.0, 1.0).numpy()

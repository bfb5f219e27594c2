"""Run-length encoding of binary masks, as returned by the predict endpoint.

The runs alternate 0s and 1s over the C-order (row-major) flattened mask and always start with
a run of 0s, which is empty (length 0) when the mask starts with a 1. So ``[5]`` is five 0s,
``[0, 5]`` five 1s and ``[2, 3, 1]`` is ``0 0 1 1 1 0``. The runs sum to the mask's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["rle_encode", "rle_decode"]


def rle_encode(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary mask, starting with the run of 0s.

    Parameters
    ----------
    mask : np.ndarray
        Any shape; bool, or numbers that are all 0 or 1.

    Returns
    -------
    list[int]
        Alternating run lengths (0s first) over ``mask.ravel(order="C")``; ``[]`` for an empty mask.

    Raises
    ------
    ValueError
        The mask holds values other than 0 and 1.
    """
    flat = np.asarray(mask).ravel(order="C")
    if flat.size == 0:
        return []
    if flat.dtype != np.bool_:
        if not np.isin(flat, (0, 1)).all():
            raise ValueError("rle_encode needs a binary mask (values 0 and 1 only)")
        flat = flat.astype(np.bool_)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.int64).tolist()


def rle_decode(runs: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The uint8 mask of ``shape`` that :func:`rle_encode` turned into ``runs``.

    Parameters
    ----------
    runs : sequence of int
        Alternating non-negative run lengths, 0s first.
    shape : sequence of int
        The mask's shape; the runs must sum to its size.

    Returns
    -------
    np.ndarray
        uint8 array of 0s and 1s with the given shape.

    Raises
    ------
    ValueError
        Negative runs, or runs that do not sum to the size of ``shape``.
    """
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must be non-negative, got {dims}")
    lengths = np.asarray(runs, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError("run lengths must be non-negative")
    size = int(np.prod(dims, dtype=np.int64))
    total = int(lengths.sum())
    if total != size:
        raise ValueError(f"runs sum to {total} but shape {dims} has {size} elements")
    values = (np.arange(lengths.size) % 2).astype(np.uint8)
    return np.repeat(values, lengths).reshape(dims)

"""Segmentation metrics. Dice here is pooled over all voxels of a set of slices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DiceCounts", "dice_score"]


@dataclass
class DiceCounts:
    """Running sums for pooled (micro) Dice: ``2 * tp / (pred + truth)``.

    Pooled Dice is defined as long as the set holds any lesion or any prediction; a set
    with neither scores 1.0 (nothing to find, nothing found).
    """

    intersection: float = 0.0
    predicted: float = 0.0
    truth: float = 0.0

    def update(self, pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> None:
        p = torch.as_tensor(pred).bool()
        t = torch.as_tensor(truth).bool()
        self.intersection += float((p & t).sum())
        self.predicted += float(p.sum())
        self.truth += float(t.sum())

    def merge(self, other: DiceCounts) -> DiceCounts:
        return DiceCounts(
            self.intersection + other.intersection,
            self.predicted + other.predicted,
            self.truth + other.truth,
        )

    @property
    def dice(self) -> float:
        denominator = self.predicted + self.truth
        return 1.0 if denominator == 0 else 2.0 * self.intersection / denominator


def dice_score(pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> float:
    """Pooled Dice of two binary masks of the same shape."""
    counts = DiceCounts()
    counts.update(pred, truth)
    return counts.dice

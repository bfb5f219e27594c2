"""Local train and evaluate loops on 2-D slices, shared by sites, benchmarks and tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

from .metrics import DiceCounts

__all__ = ["TrainResult", "EvalResult", "train_epochs", "evaluate", "predict_probabilities"]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean loss over the last epoch's batches
    num_examples: int  # training slices (FedAvg's weight: samples, not batches)
    steps: int


@dataclass(frozen=True)
class EvalResult:
    loss: float
    counts: DiceCounts
    num_examples: int

    @property
    def dice(self) -> float:
        return self.counts.dice


def _tensors(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)).unsqueeze(1)
    return x, y


def _loss() -> torch.nn.Module:
    return DiceCELoss(sigmoid=True, batch=True)


def train_epochs(
    net: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train ``net`` in place with Adam for ``epochs`` passes over ``(slices, S, S)`` arrays.

    ``proximal_mu > 0`` adds FedProx's term ``mu / 2 * ||w - w_start||^2`` to the loss.
    """
    if len(images) == 0:
        raise ValueError("no training slices")
    x, y = _tensors(images, masks)
    generator = torch.Generator().manual_seed(seed)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = _loss()
    anchor = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
    steps, epoch_loss = 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            if anchor:
                loss = loss + proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(net.parameters(), anchor)
                )
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            steps += 1
        epoch_loss = total / max(batches, 1)
    return TrainResult(loss=epoch_loss, num_examples=len(x), steps=steps)


@torch.no_grad()
def predict_probabilities(
    net: torch.nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int = 32
) -> np.ndarray:
    """Sigmoid probabilities ``(slices, S, S)`` for preprocessed slices."""
    net.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    out = [
        torch.sigmoid(net(x[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).squeeze(1).numpy() if out else np.zeros_like(images, dtype=np.float32)


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 32,
    threshold: float = 0.5,
) -> EvalResult:
    """Loss and pooled Dice counts of ``net`` on preprocessed slices."""
    net.to(device).eval()
    x, y = _tensors(images, masks)
    loss_fn = _loss()
    counts, total, batches = DiceCounts(), 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = net(xb)
        total += float(loss_fn(logits, yb))
        batches += 1
        counts.update(torch.sigmoid(logits) >= threshold, yb > 0.5)
    return EvalResult(loss=total / max(batches, 1), counts=counts, num_examples=len(x))

"""Local train and evaluate loops on 2-D slices, shared by sites, benchmarks and tests.

Mixed precision (``autocast``): on a CUDA device only, ``torch.autocast`` around the forward
pass and the loss, with a ``GradScaler`` for float16 (bfloat16 needs none). On the CPU, and with
``autocast=None``, the loops run exactly the float32 operations they always did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

from .errors import ConfigError
from .metrics import DiceCounts

__all__ = [
    "PRECISION_SETTINGS",
    "TrainResult",
    "EvalResult",
    "autocast_dtype",
    "train_epochs",
    "evaluate",
    "predict_probabilities",
]

#: Accepted values of a node's ``mixed-precision`` setting.
PRECISION_SETTINGS = ("auto", "true", "false", "fp16", "float16", "bf16", "bfloat16")


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


def autocast_dtype(device: torch.device, setting: str = "auto", *, dp: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``device`` and a node's ``mixed-precision`` setting; None: float32.

    ``auto`` and ``true`` mean float16 on CUDA. Never on a CPU. Never under DP-SGD (``dp``):
    Opacus 1.6 clips per-sample gradients inside ``optimizer.step()``, and a GradScaler would
    hand it scaled gradients, so ``max-grad-norm`` (and with it the privacy guarantee) would
    apply to the wrong norms.
    """
    setting = str(setting).strip().lower()
    if setting not in PRECISION_SETTINGS:
        raise ConfigError(f"mixed-precision={setting!r}: use one of {', '.join(PRECISION_SETTINGS)}")
    if device.type != "cuda" or dp or setting == "false":
        return None
    if setting in ("bf16", "bfloat16"):
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"mixed-precision={setting!r}: this GPU does not support bfloat16")
        return torch.bfloat16
    return torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    if device.type != "cuda":
        raise ConfigError(f"mixed precision ({dtype}) needs a CUDA device, not {device}")
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


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
    autocast: torch.dtype | None = None,
) -> TrainResult:
    """Train ``net`` in place with Adam for ``epochs`` passes over ``(slices, S, S)`` arrays.

    ``proximal_mu > 0`` adds FedProx's term ``mu / 2 * ||w - w_start||^2`` to the loss.
    ``autocast`` (CUDA only, see :func:`autocast_dtype`) runs the forward pass in that dtype.
    """
    if len(images) == 0:
        raise ValueError("no training slices")
    x, y = _tensors(images, masks)
    generator = torch.Generator().manual_seed(seed)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = _loss()
    anchor = [p.detach().clone() for p in net.parameters()] if proximal_mu > 0 else []
    mixed = _autocast(device, autocast)
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
    steps, epoch_loss = 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            with mixed():
                loss = loss_fn(net(xb), yb)
            if anchor:
                loss = loss + proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(net.parameters(), anchor)
                )
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
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
    _ready_for_inference(net, device)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    out = [
        torch.sigmoid(net(x[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).squeeze(1).numpy() if out else np.zeros_like(images, dtype=np.float32)


def _ready_for_inference(net: torch.nn.Module, device: torch.device) -> None:
    """Move ``net`` to ``device`` and into eval mode, only when it is not there yet: both walk
    every module, which costs about as much as a small U-Net's forward on a few slices."""
    first = next(net.parameters(), None)
    if first is not None and first.device != device:
        net.to(device)
    if any(m.training for m in net.modules()):
        net.eval()


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 32,
    threshold: float = 0.5,
    autocast: torch.dtype | None = None,
) -> EvalResult:
    """Loss and pooled Dice counts of ``net`` on preprocessed slices (``autocast``: CUDA only)."""
    net.to(device).eval()
    x, y = _tensors(images, masks)
    loss_fn = _loss()
    mixed = _autocast(device, autocast)
    counts, total, batches = DiceCounts(), 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        with mixed():
            logits = net(xb)
            total += float(loss_fn(logits, yb))
        batches += 1
        counts.update(torch.sigmoid(logits.float()) >= threshold, yb > 0.5)
    return EvalResult(loss=total / max(batches, 1), counts=counts, num_examples=len(x))

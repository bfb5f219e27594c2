"""Local DP-SGD training of the U-Net with Opacus.

The non-private loop lives in :mod:`imaging.training`; this is its private twin. Differences
that matter for the guarantee:

- Poisson sampling (each slice joins each batch independently with rate ``q``), so a batch may
  be empty; an empty batch still takes a (noise-only) step, as the accountant assumes.
- A per-sample-decomposable loss: ``DiceCELoss(sigmoid=True, batch=False)``. The non-private
  loop's ``batch=True`` Dice pools voxels over the batch, so one slice's gradient depends on
  the others and per-sample clipping no longer bounds one slice's influence.
- The randomness of sampling and noise is never derived from a value anyone else knows (such
  as the federation's seed): whoever can replay the noise can subtract it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss
from opacus import PrivacyEngine
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch.utils.data import DataLoader, TensorDataset

from .accounting import noise_for_target_epsilon, poisson_sample_rate, steps_per_epoch
from .config import DPConfig
from .errors import PrivacyConfigError

__all__ = ["DPTrainResult", "make_private_training", "per_sample_loss", "validate_module"]


@dataclass(frozen=True)
class DPTrainResult:
    """What one DP-SGD training run did: enough to record it in the privacy ledger.

    Attributes
    ----------
    loss : float
        Mean loss over the last epoch's non-empty batches.
    num_examples : int
        Training slices N (FedAvg's weight: samples, not batches).
    steps : int
        Noisy optimizer steps taken (empty Poisson batches included): the accountant's count.
    noise_multiplier : float
        σ used (given, or derived from ``target_epsilon``).
    sample_rate : float
        Poisson sampling rate q actually used (``1 / ceil(N / batch_size)``).
    delta : float
        δ of the guarantee.
    epsilon : float
        ε of *this run alone* at ``delta``. Not what the site has spent: see the ledger.
    """

    loss: float
    num_examples: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    epsilon: float


def per_sample_loss() -> torch.nn.Module:
    """Dice + BCE averaged per slice, then over the batch: decomposable into per-sample terms."""
    return DiceCELoss(sigmoid=True, batch=False, reduction="mean")


def validate_module(net: torch.nn.Module) -> None:
    """Check that Opacus can train ``net`` (no batch norm, no unsupported layer).

    Raises
    ------
    PrivacyConfigError
        Naming the offending layers and Opacus' reasons.
    """
    was_training = net.training
    net.train()
    try:
        ModuleValidator.validate(net, strict=True)
    except UnsupportedModuleError as exc:
        offenders = []
        for name, module in trainable_modules(net):
            check = ModuleValidator.VALIDATORS.get(type(module))
            if check is not None and check(module):
                offenders.append(f"{name or '<root>'} ({type(module).__name__})")
        raise PrivacyConfigError(
            f"the network cannot be trained with DP-SGD; offending layers: "
            f"{', '.join(offenders) or 'unknown'}; Opacus says: {exc}"
        ) from exc
    finally:
        net.train(was_training)


def _generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # from the OS's random device, not from torch's (possibly seeded) global RNG
    else:
        gen.manual_seed(seed)
    return gen


def _dataset(images: np.ndarray, masks: np.ndarray) -> TensorDataset:
    if len(images) == 0:
        raise PrivacyConfigError("no training slices")
    if np.shape(images) != np.shape(masks):
        raise PrivacyConfigError(
            f"images {np.shape(images)} and masks {np.shape(masks)} differ in shape"
        )
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)).unsqueeze(1)
    return TensorDataset(x, y)


def _noise_only_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch: zero per-sample gradients, so the step adds noise only."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def make_private_training(
    net: torch.nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    config: DPConfig,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    device: torch.device,
    seed: int | None = None,
) -> DPTrainResult:
    """Train ``net`` in place with DP-SGD (Adam, per-sample clipping, Gaussian noise).

    Parameters
    ----------
    net : torch.nn.Module
        The U-Net; trained in place, its ``state_dict`` keys unchanged (no ``_module.`` prefix).
    images, masks : np.ndarray
        ``(slices, S, S)`` preprocessed slices and binary masks.
    config : DPConfig
        Must be enabled.
    batch_size : int
        Expected Poisson batch size; the sample rate is ``1 / ceil(N / batch_size)``.
    epochs : int
        Passes; each is ``ceil(N / batch_size)`` Poisson batches.
    learning_rate : float
        Adam's learning rate.
    device : torch.device
        Where to train (pass ``imaging.model.select_device()`` to use the GPU when present).
    seed : int or None
        ``None`` (production): sampling and noise from the OS's random device. An int makes the
        run reproducible and is for tests only: anyone who knows it can remove the noise.

    Returns
    -------
    DPTrainResult

    Raises
    ------
    PrivacyConfigError
        DP disabled, bad sizes, δ not below 1/N, an unreachable target ε, or a layer Opacus
        cannot train.
    """
    if not config.enabled:
        raise PrivacyConfigError(
            "DP-SGD is disabled in this DPConfig; train with imaging.training.train_epochs"
        )
    if batch_size < 1 or epochs < 1 or not learning_rate > 0:
        raise PrivacyConfigError(
            f"need batch_size >= 1, epochs >= 1, learning_rate > 0; got {batch_size}, "
            f"{epochs}, {learning_rate}"
        )
    dataset = _dataset(images, masks)
    n = len(dataset)
    delta = config.delta_for(n)
    sample_rate = poisson_sample_rate(n, batch_size)
    planned_steps = epochs * steps_per_epoch(sample_rate)
    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    else:
        assert config.target_epsilon is not None
        sigma = noise_for_target_epsilon(
            target_epsilon=config.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            accountant=config.accountant,
        )

    device = torch.device(device)
    net.to(device).train()
    validate_module(net)
    keys = list(net.state_dict().keys())

    sampling = _generator("cpu", seed)
    noise = _generator(device, None if seed is None else seed + 1)
    loader = DataLoader(dataset, batch_size=batch_size, generator=sampling)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: randomness comes from the OS (see `seed`).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=config.accountant)
        dp_net, dp_optimizer, dp_loader = engine.make_private(
            module=net,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            loss_reduction="mean",
        )
    if abs(dp_loader.sample_rate - sample_rate) > 1e-12:  # pragma: no cover - Opacus changed
        raise PrivacyConfigError(
            f"Opacus samples at rate {dp_loader.sample_rate}, expected {sample_rate}"
        )
    params = [p for p in net.parameters() if p.requires_grad]
    loss_fn = per_sample_loss()
    taken, epoch_loss = 0, float("nan")
    try:
        with warnings.catch_warnings():
            # Inputs never require grad, so full backward hooks fire on module outputs only.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                total, batches = 0.0, 0
                for xb, yb in dp_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    if len(xb) == 0:
                        _noise_only_step(dp_optimizer, params)
                    else:
                        loss = loss_fn(dp_net(xb.to(device)), yb.to(device))
                        loss.backward()
                        dp_optimizer.step()
                        total += float(loss.detach())
                        batches += 1
                    taken += 1
                epoch_loss = total / batches if batches else float("nan")
        dp_optimizer.zero_grad(set_to_none=True)
    finally:
        dp_net.cleanup()  # remove Opacus' hooks and per-sample attributes from `net`
    accounted = sum(steps for _, _, steps in engine.accountant.history)
    if accounted != taken:  # pragma: no cover - a skipped step would void the accounting
        raise PrivacyConfigError(f"accountant counted {accounted} steps, loop took {taken}")
    if list(net.state_dict().keys()) != keys:  # pragma: no cover - Opacus renamed parameters
        raise PrivacyConfigError("DP training changed the network's state_dict keys")
    return DPTrainResult(
        loss=epoch_loss,
        num_examples=n,
        steps=taken,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        delta=delta,
        epsilon=float(engine.accountant.get_epsilon(delta=delta)) if taken else 0.0,
    )

"""The U-Net factory: one place builds the network, for training and for serving."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

from .errors import ConfigError
from .spec import ModelSpec

__all__ = ["build_unet", "load_state_dict", "select_device"]


def _norm(spec: ModelSpec) -> tuple | str:
    if spec.norm == "instance":
        return ("instance", {"affine": True})
    # Group norm: the largest group count up to 8 dividing every normalised layer's channels;
    # MONAI also normalises the top up-sampling layer (out_channels wide), so that counts too.
    widths = (*spec.channels, spec.out_channels)
    groups = max(g for g in range(1, 9) if all(c % g == 0 for c in widths))
    return ("group", {"num_groups": groups})


def build_unet(spec: ModelSpec) -> torch.nn.Module:
    """Build the MONAI 2-D U-Net described by ``spec`` (instance or group norm, no batch norm)."""
    net = UNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=spec.num_res_units,
        norm=_norm(spec),
    )
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ConfigError("the U-Net contains batch norm, which DP-SGD cannot train")
    return net


def load_state_dict(spec: ModelSpec, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the network for ``spec`` and load ``state`` strictly (names and shapes must match)."""
    net = build_unet(spec)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"weights do not match the model spec: {exc}") from exc
    return net


def select_device(preferred: str = "auto") -> torch.device:
    """The device a node trains on: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``.

    Raises
    ------
    ConfigError
        An unknown device name, or a CUDA device that this machine does not have.
    """
    name = str(preferred).strip().lower() or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index_text = name[5:] if name.startswith("cuda:") else ""
    if name != "cuda" and not index_text.isdigit():
        raise ConfigError(f"unknown device {preferred!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {preferred!r} requested but no CUDA GPU is available")
    if index_text and int(index_text) >= torch.cuda.device_count():
        raise ConfigError(f"device {preferred!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)

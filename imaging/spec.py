"""The model and preprocessing spec: the contract between training and serving.

A registered model is its state_dict plus this spec; serving rebuilds the network with the
same factory that trained it (no pickled nn.Module).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["ModelSpec", "SPEC_VERSION"]

SPEC_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Architecture, preprocessing and output semantics of a fedseg model.

    Parameters
    ----------
    channels : tuple[int, ...]
        U-Net feature channels per level (MONAI ``UNet.channels``).
    num_res_units : int
        Residual units per block.
    norm : str
        ``"instance"`` or ``"group"``: never batch norm, which DP-SGD cannot use.
    image_size : int
        Slices are resized to ``image_size x image_size`` before the network.
    lower_percentile, upper_percentile : float
        Per-series intensity window mapped to [0, 1] (robust to scanner offsets and scales).
    threshold : float
        Voxel probability at or above which a voxel is lesion.
    triage_threshold : float
        Score at or above which a series is ``"suspect"``.
    min_lesion_pixels : int
        The score is the mean probability of the ``min_lesion_pixels`` most likely pixels of
        the most suspicious slice, so one hot pixel does not flag a series.
    label_names : tuple[str, ...]
        Names of the foreground labels (one today).
    """

    channels: tuple[int, ...] = (8, 16, 32)
    num_res_units: int = 1
    norm: str = "instance"
    image_size: int = 64
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    threshold: float = 0.5
    triage_threshold: float = 0.5
    min_lesion_pixels: int = 8
    label_names: tuple[str, ...] = ("lesion",)
    architecture: str = "monai.networks.nets.UNet"
    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    spec_version: int = SPEC_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.channels) < 2:
            raise ConfigError(f"channels needs at least 2 levels, got {self.channels!r}")
        if any(c <= 0 for c in self.channels):
            raise ConfigError(f"channels must be positive, got {self.channels!r}")
        if self.norm not in ("instance", "group"):
            raise ConfigError(
                f"norm must be 'instance' or 'group' (DP-SGD forbids batch norm), got {self.norm!r}"
            )
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} must be a positive multiple of {factor} "
                f"for {len(self.channels)} U-Net levels"
            )
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ConfigError("need 0 <= lower_percentile < upper_percentile <= 100")
        for name in ("threshold", "triage_threshold"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in (0, 1)")
        if self.spatial_dims != 2 or self.in_channels != 1 or self.out_channels != 1:
            raise ConfigError("only 2-D, single-channel, single-label U-Nets are supported today")

    @property
    def strides(self) -> tuple[int, ...]:
        return (2,) * (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["label_names"] = list(self.label_names)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model spec keys: {sorted(unknown)}")
        if data.get("spec_version", SPEC_VERSION) != SPEC_VERSION:
            raise ConfigError(f"model spec version {data.get('spec_version')} is not supported")
        values = dict(data)
        values["channels"] = tuple(values.get("channels", cls.channels))
        values["label_names"] = tuple(values.get("label_names", cls.label_names))
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model spec is not valid JSON: {exc}") from exc

"""Node-local execution settings from the SuperNode's ``--node-config`` (never the run config).

``device``           ``auto`` (default: the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``
``mixed-precision``  ``auto`` (default: float16 autocast on CUDA), ``true``/``fp16``, ``bf16``,
                     ``false``; never on the CPU, never under DP-SGD (see imaging.training)
``audit-file``       the site's audit log (default: the site config's, else
                     ``$FEDSEG_HOME/audit/<site-name>.jsonl``)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging.errors import ConfigError
from imaging.training import PRECISION_SETTINGS

from .errors import SiteConfigError

__all__ = ["NodeSettings"]


@dataclass(frozen=True)
class NodeSettings:
    device: str = "auto"
    mixed_precision: str = "auto"
    audit_file: Path | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision not in PRECISION_SETTINGS:
            raise SiteConfigError(f"node config mixed-precision={self.mixed_precision!r}: use one of "
                                  f"{', '.join(PRECISION_SETTINGS)}")
        device = self.device
        if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()
        ):
            raise SiteConfigError(f"node config device={device!r}: use auto, cpu, cuda or cuda:N")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        def text(key: str, default: str) -> str:
            return str(node_config.get(key, default)).strip().lower() or default

        raw_audit = str(node_config.get("audit-file", "")).strip()
        try:
            return cls(device=text("device", "auto"), mixed_precision=text("mixed-precision", "auto"),
                       audit_file=Path(raw_audit).expanduser() if raw_audit else None)
        except ConfigError as exc:
            raise SiteConfigError(str(exc)) from exc

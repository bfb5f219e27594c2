"""The service's settings, read from ``FEDSEG_SERVE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.errors import ModelUriError
from registry.uri import parse_model_uri

__all__ = ["ServingSettings", "DEFAULT_MODEL_URI"]

DEFAULT_MODEL_URI = "models:/fedseg-unet@champion"


class ServingSettings(BaseSettings):
    """Settings of the prediction service.

    Every field reads ``FEDSEG_SERVE_<FIELD>`` (e.g. ``FEDSEG_SERVE_MODEL_URI``); keyword arguments
    win over the environment. Where the registry lives is the registry's own setting
    (``FEDSEG_HOME`` or ``FEDSEG_MLFLOW_TRACKING_URI``).

    Attributes
    ----------
    model_uri : str
        ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
    host, port : str, int
        Where uvicorn listens (loopback by default: put a TLS proxy in front to expose it).
    max_upload_mb : int
        Largest accepted request body, in MiB.
    max_instances : int
        Most DICOM files in one request.
    device : str
        ``"auto"`` (GPU when there is one), ``"cpu"`` or ``"cuda[:N]"``.
    batch_size : int
        Slices per forward pass.
    """

    model_config = SettingsConfigDict(
        env_prefix="FEDSEG_SERVE_", extra="ignore", protected_namespaces=()
    )

    model_uri: str = DEFAULT_MODEL_URI
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_upload_mb: int = Field(default=256, ge=1, le=4096)
    max_instances: int = Field(default=2000, ge=1, le=100_000)
    device: str = "auto"
    batch_size: int = Field(default=32, ge=1, le=1024)

    @field_validator("model_uri")
    @classmethod
    def _check_model_uri(cls, value: str) -> str:
        try:
            return str(parse_model_uri(value))
        except ModelUriError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value) or "/" in value:
            raise ValueError(f"host must be a host name or IP address, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        head, _, index = value.partition(":")
        if value in ("auto", "cpu") or (head == "cuda" and (not index or index.isdigit())):
            return value
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

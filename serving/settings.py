"""The service's settings, read from ``FEDSEG_SERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
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
    compile : bool
        Compile each loaded model with ``torch.compile`` before it serves (:mod:`serving.compiled`):
        a faster forward for a slower load; the eager network serves when compiling fails.
    reload_seconds : float
        How often the service checks the registry for a moved alias (champion, challenger) and
        hot-swaps the new version; 0 disables following the registry.
    canary_share : float
        Share (0..1) of studies sent to the challenger, sticky per StudyInstanceUID.
    challenger_uri : str, optional
        The challenger (default ``models:/NAME@challenger`` with the champion's NAME); loaded
        only when ``canary_share > 0``.
    microbatch_max_slices : int
        Most slices of concurrent requests combined into one forward pass.
    microbatch_wait_ms : float
        Longest wait of a request for concurrent requests (already being read) to join its batch.
    auth : str
        ``"apikey"``, ``"jwt"``, ``"apikey,jwt"`` (either) or ``"off"`` (loopback hosts only);
        see the README's API-consumer section.
    max_pixel_mb : int
        Pixel budget of one request: the sum over its instances of rows x columns x frames x
        samples x bits allocated, in MiB, checked from the headers before any pixel is decoded.
        Deflated instances may inflate to at most this much (plus 1 MiB of header each).
    apikey_file : Path, optional
        The API key store (default ``$FEDSEG_HOME/serving/apikeys.json``).
    jwt_issuer, jwt_audience : str, optional
        Required ``iss`` and ``aud`` of bearer JWTs (``auth`` includes ``jwt``).
    jwt_key_file : Path, optional
        PEM public key or JWKS file that signs the JWTs (read locally, never fetched).
    jwt_algorithms : str
        Accepted JWT algorithms, comma-separated (asymmetric only; default ``RS256,ES256``).
    drift_threshold : float
        Relative deviation of the recent inputs from the training reference that raises the
        drift alert (``GET /v1/drift``, ``fedseg_drift_alert``).
    drift_window : int
        How many recent requests the drift statistics cover.
    drift_min_requests : int
        Requests needed in the window before the drift alert can be raised.
    stow_url : str, optional
        DICOMweb root of the PACS that ``?store=true`` sends DICOM SEGs to (STOW-RS), with
        ``stow_username``/``stow_password`` (HTTP basic) or ``stow_token`` (bearer).
    jobs_workers : int
        Threads that run ``/v1/jobs`` (0: accept jobs only; another process runs them).
    jobs_lease_s : float
        How long a worker owns a claimed job; a job whose worker died is claimed again after it.
    jobs_max_attempts : int
        Claims of one job before it is marked failed (a job that kills its worker).
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
    compile: bool = True
    reload_seconds: float = Field(default=15.0, ge=0, le=86_400)
    canary_share: float = Field(default=0.0, ge=0, le=1)
    challenger_uri: str | None = None
    microbatch_max_slices: int = Field(default=64, ge=1, le=8192)
    microbatch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    auth: str = "apikey"
    max_pixel_mb: int = Field(default=1024, ge=1, le=65_536)
    apikey_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_key_file: Path | None = None
    jwt_algorithms: str = "RS256,ES256"
    drift_threshold: float = Field(default=0.25, gt=0, le=100)
    drift_window: int = Field(default=200, ge=1, le=100_000)
    drift_min_requests: int = Field(default=20, ge=1, le=100_000)
    stow_url: str | None = None
    stow_username: str | None = None
    stow_password: SecretStr | None = None
    stow_token: SecretStr | None = None
    jobs_workers: int = Field(default=1, ge=0, le=64)
    jobs_lease_s: float = Field(default=600.0, gt=0, le=86_400)
    jobs_max_attempts: int = Field(default=3, ge=1, le=100)

    @field_validator("model_uri")
    @classmethod
    def _check_model_uri(cls, value: str) -> str:
        try:
            return str(parse_model_uri(value))
        except ModelUriError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("challenger_uri")
    @classmethod
    def _check_challenger_uri(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            return str(parse_model_uri(value))
        except ModelUriError as exc:
            raise ValueError(str(exc)) from None

    @property
    def challenger_model_uri(self) -> str:
        """``challenger_uri``, or ``models:/NAME@challenger`` with the champion's NAME."""
        return self.challenger_uri or f"models:/{parse_model_uri(self.model_uri).name}@challenger"

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value) or "/" in value:
            raise ValueError(f"host must be a host name or IP address, got {value!r}")
        return value

    @field_validator("stow_url")
    @classmethod
    def _check_stow_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or any(c.isspace() for c in value):
            raise ValueError(f"stow_url must be an http(s) DICOMweb root, got {value!r}")
        return value

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, value: str) -> str:
        methods = {m.strip().lower() for m in value.replace("+", ",").split(",") if m.strip()}
        if methods == {"off"}:
            return "off"
        if not methods or not methods <= {"apikey", "jwt"}:
            raise ValueError(f"auth must be 'apikey', 'jwt', 'apikey,jwt' or 'off', got {value!r}")
        return ",".join(m for m in ("apikey", "jwt") if m in methods)

    @model_validator(mode="after")
    def _check_auth_settings(self) -> ServingSettings:
        if self.auth == "off" and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"auth 'off' is only allowed on a loopback host, not {self.host!r}: "
                "use API keys or JWTs (FEDSEG_SERVE_AUTH)"
            )
        if "jwt" in self.auth_methods:
            missing = [f"FEDSEG_SERVE_{k.upper()}" for k in ("jwt_issuer", "jwt_audience", "jwt_key_file")
                       if not getattr(self, k)]
            if missing:
                raise ValueError(f"auth 'jwt' needs {', '.join(missing)}")
        return self

    @property
    def auth_methods(self) -> tuple[str, ...]:
        """The enabled auth methods (empty when auth is off)."""
        return () if self.auth == "off" else tuple(self.auth.split(","))

    @property
    def max_pixel_bytes(self) -> int:
        return self.max_pixel_mb * 1024 * 1024

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

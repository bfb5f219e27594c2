"""STOW-RS: store DICOM objects in a PACS over DICOMweb (``POST {root}/studies``)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from ..errors import ServingError
from ..schemas import StoredSeg
from ..settings import ServingSettings
from .seg import DICOM_MEDIA_TYPE, SegObject

__all__ = ["StowError", "StowNotConfiguredError", "StowResult", "StowTarget", "stow", "store_seg", "target_from_settings"]

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


class StowError(ServingError):
    """The PACS is not configured, cannot be reached, or refused the objects (message says which)."""


class StowNotConfiguredError(StowError):
    """A request asked to store, but the service has no PACS (``FEDSEG_SERVE_STOW_URL``)."""


@dataclass(frozen=True)
class StowTarget:
    """Where and as whom to store.

    Attributes
    ----------
    url : str
        The DICOMweb root, e.g. ``http://pacs:8042/dicom-web`` (``/studies`` is appended).
    username, password : str, optional
        HTTP basic credentials.
    token : str, optional
        A bearer token (used instead of basic credentials).
    timeout_s : float
        Per-request timeout.
    """

    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 30.0

    def _auth_headers(self) -> tuple[httpx.Auth | None, dict[str, str]]:
        if self.token:
            return None, {"Authorization": f"Bearer {self.token}"}
        if self.username:
            return httpx.BasicAuth(self.username, self.password or ""), {}
        return None, {}


@dataclass(frozen=True)
class StowResult:
    """What the PACS accepted."""

    url: str
    sop_instance_uids: tuple[str, ...]


def target_from_settings(settings: ServingSettings) -> StowTarget:
    """The PACS of ``FEDSEG_SERVE_STOW_*``.

    Raises
    ------
    StowError
        ``FEDSEG_SERVE_STOW_URL`` is not set.
    """
    if not settings.stow_url:
        raise StowNotConfiguredError("store=true needs a PACS: set FEDSEG_SERVE_STOW_URL (DICOMweb root) and "
                        "FEDSEG_SERVE_STOW_USERNAME/_PASSWORD or _TOKEN")
    password, token = settings.stow_password, settings.stow_token
    return StowTarget(
        url=settings.stow_url,
        username=settings.stow_username,
        password=password.get_secret_value() if password else None,
        token=token.get_secret_value() if token else None,
    )


def _multipart(objects: Sequence[SegObject]) -> tuple[bytes, str]:
    boundary = f"fedseg-{secrets.token_hex(16)}"
    parts = bytearray()
    for obj in objects:
        parts += f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode()
        parts += obj.data + b"\r\n"
    parts += f"--{boundary}--\r\n".encode()
    content_type = f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'
    return bytes(parts), content_type


def _values(item: dict, tag: str) -> list:
    return list((item.get(tag) or {}).get("Value") or [])


def stow(target: StowTarget, objects: Sequence[SegObject], *, client: httpx.Client | None = None) -> StowResult:
    """Store ``objects`` with one STOW-RS request.

    Raises
    ------
    StowError
        The PACS cannot be reached, answers an error, or reports failed instances.
    """
    if not objects:
        raise StowError("nothing to store")
    url = target.url.rstrip("/") + "/studies"
    body, content_type = _multipart(objects)
    auth, headers = target._auth_headers()
    headers |= {"Content-Type": content_type, "Accept": "application/dicom+json"}
    own = client is None
    http = client or httpx.Client(timeout=target.timeout_s)
    try:
        response = http.post(url, content=body, headers=headers, auth=auth or httpx.USE_CLIENT_DEFAULT)
    except httpx.HTTPError as exc:
        raise StowError(f"STOW-RS to {url} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            http.close()
    if response.status_code >= 400:
        raise StowError(f"STOW-RS to {url} answered HTTP {response.status_code}: {response.text[:300]}")
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    failed = _values(answer, _FAILED_SOP_SEQUENCE) if isinstance(answer, dict) else []
    if failed:
        reasons = ", ".join(
            f"{_values(f, _SOP_INSTANCE_UID)[:1] or '?'} (reason {_values(f, _FAILURE_REASON)[:1] or '?'})"
            for f in failed
        )
        raise StowError(f"the PACS at {url} refused {len(failed)} instance(s): {reasons}")
    stored = [
        str(v) for item in (_values(answer, _REFERENCED_SOP_SEQUENCE) if isinstance(answer, dict) else [])
        for v in _values(item, _SOP_INSTANCE_UID)
    ]
    return StowResult(url=url, sop_instance_uids=tuple(stored or (o.sop_instance_uid for o in objects)))


def store_seg(seg: SegObject, target: StowTarget) -> StoredSeg:
    """Store one SEG in the PACS; what to tell the client (blocking).

    Raises
    ------
    StowError
    """
    result = stow(target, [seg])
    return StoredSeg(url=result.url, study_instance_uid=seg.study_instance_uid,
                     series_instance_uid=seg.series_instance_uid, sop_instance_uid=seg.sop_instance_uid)

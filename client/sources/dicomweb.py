"""A PACS through DICOMweb: QIDO-RS finds the selected series, WADO-RS retrieves them into a cache.

Tested against Orthanc's DICOMweb plug-in. Each :meth:`DicomWebSource.sync` lists the series
that match the site's selection rules and the SEG series of their studies, compares each series'
SOPInstanceUIDs with the local cache, and retrieves only what is new: an unchanged series costs
one QIDO request and no retrieval; a changed one is updated (new instances fetched, vanished
ones removed). The cache is a plain DICOM folder, read by the same code as a folder source.

Credentials come only from the node's environment (:class:`PacsCredentials`), never from a URL,
the site config or the run config.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pydicom

from imaging.selection import SeriesSelection

from ..errors import PacsAuthError, PacsError, SiteConfigError
from .base import SyncReport
from .multipart import boundary_of, iter_parts

__all__ = [
    "ENV_USERNAME",
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "PacsCredentials",
    "DicomWebSource",
    "check_pacs_url",
]

log = logging.getLogger("fedseg.client.pacs")

ENV_USERNAME = "FEDSEG_PACS_USERNAME"
ENV_PASSWORD = "FEDSEG_PACS_PASSWORD"
ENV_TOKEN = "FEDSEG_PACS_TOKEN"

#: Modalities of series that are not images (never selected as training input).
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "REG", "DOC", "RTSTRUCT", "RTPLAN",
                                  "RTRECORD", "RTDOSE"})
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_PAGE = 1000
_STATE_FORMAT = 1

# DICOM JSON tags (PS3.18 F.2)
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _DESCRIPTION, _N_INSTANCES = "00080060", "0008103E", "00201209"


@dataclass(frozen=True)
class PacsCredentials:
    """HTTP basic credentials or a bearer token for the PACS (or none)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PacsCredentials:
        """Read ``FEDSEG_PACS_USERNAME`` + ``FEDSEG_PACS_PASSWORD``, or ``FEDSEG_PACS_TOKEN``.

        Raises
        ------
        SiteConfigError
            Both kinds are set, or a username without a password (or the reverse).
        """
        env = os.environ if environ is None else environ
        user = env.get(ENV_USERNAME, "").strip() or None
        password = env.get(ENV_PASSWORD) or None
        token = env.get(ENV_TOKEN, "").strip() or None
        if token and (user or password):
            raise SiteConfigError(f"set either {ENV_TOKEN} or {ENV_USERNAME} and {ENV_PASSWORD}, "
                                  "not both")
        if bool(user) != bool(password):
            missing = ENV_PASSWORD if user else ENV_USERNAME
            raise SiteConfigError(f"{ENV_USERNAME} and {ENV_PASSWORD} go together: {missing} is not set")
        return cls(user, password, token)

    def describe(self) -> str:
        if self.token:
            return "bearer token"
        return f"basic auth as {self.username!r}" if self.username else "no credentials"

    def client_kwargs(self) -> dict[str, Any]:
        if self.token:
            return {"headers": {"Authorization": f"Bearer {self.token}"}}
        if self.username and self.password:
            return {"auth": httpx.BasicAuth(self.username, self.password)}
        return {}


def check_pacs_url(url: str) -> str:
    """The DICOMweb root without a trailing slash; refuses credentials and queries in it.

    Raises
    ------
    SiteConfigError
        Not http(s), no host, a user or password in it, or a query string or fragment.
    """
    raw = str(url).strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SiteConfigError(f"PACS url {raw!r} must be an http:// or https:// DICOMweb root")
    if parts.username is not None or parts.password is not None:
        raise SiteConfigError(
            "the PACS url holds credentials: remove them from the url and set "
            f"{ENV_USERNAME} and {ENV_PASSWORD} (or {ENV_TOKEN}) in the node's environment"
        )
    if parts.query or parts.fragment:
        raise SiteConfigError(
            f"the PACS url must be the DICOMweb root, without a query or fragment (tokens go in "
            f"{ENV_TOKEN}), got {parts.scheme}://{parts.netloc}{parts.path}?..."
        )
    return raw.rstrip("/")


def _key(uid: str) -> str:
    """A file-system name for a UID (no identifier in the cache's paths)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:24]


def _value(item: Mapping[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class _SeriesRef:
    study: str
    series: str
    modality: str
    description: str
    count: int | None


@dataclass(frozen=True)
class DicomWebSource:
    """A PACS's series, selected by ``selection``, kept current in ``cache_root``.

    Parameters
    ----------
    url : str
        The DICOMweb root, e.g. ``http://pacs:8042/dicom-web`` (Orthanc).
    cache_root : Path
        The fetch cache: ``dicom/`` (one folder per series, files named by hashed UIDs) and
        ``state.json``. It holds pixels and identifiers: it stays on the node's disk.
    selection : SeriesSelection
        The site's rules (modality, series description pattern, minimum slices).
    credentials : PacsCredentials, optional
        Default: read from the environment at each sync.
    ca_file : Path, optional
        The CA bundle for an https PACS (default: the system's).
    timeout_s : float
        Per request.
    transport : httpx.BaseTransport, optional
        The HTTP transport (a test's seam to observe requests).
    """

    url: str
    cache_root: Path
    selection: SeriesSelection = field(default_factory=SeriesSelection)
    credentials: PacsCredentials | None = field(default=None, repr=False, compare=False)
    ca_file: Path | None = None
    timeout_s: float = 60.0
    transport: httpx.BaseTransport | None = field(default=None, repr=False, compare=False)
    kind: str = field(default="dicomweb", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", check_pacs_url(self.url))
        object.__setattr__(self, "cache_root", Path(self.cache_root))

    @property
    def folder(self) -> Path:
        """The cached DICOM folder that the dataset loader and the site check read."""
        return self.cache_root / "dicom"

    @property
    def state_file(self) -> Path:
        return self.cache_root / "state.json"

    def describe(self) -> str:
        return f"DICOMweb PACS {self.url}"

    # ----------------------------------------------------------------------------------- sync

    def sync(self) -> SyncReport:
        """Bring the cache up to date with the PACS; see the module's docstring.

        When the PACS cannot be reached and the cache holds data, that data is used as it is
        (``offline=True``) so that a round can still run.

        Raises
        ------
        PacsAuthError
            The PACS refused the credentials.
        PacsError
            The PACS cannot be reached (and nothing is cached) or answered with an error.
        SiteConfigError
            The credentials in the environment are incomplete.
        """
        credentials = self.credentials or PacsCredentials.from_env()
        self.cache_root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            state = self._read_state()
            try:
                with self._client(credentials) as client:
                    return self._sync(client, state)
            except httpx.TransportError as exc:
                if state["series"] and self.folder.is_dir():
                    log.warning("PACS %s unreachable (%s): using the %d cached series", self.url,
                                exc, len(state["series"]))
                    return SyncReport(folder=self.folder, offline=True)
                raise PacsError(f"cannot reach the PACS at {self.url}: {exc}") from exc

    def _sync(self, client: httpx.Client, state: dict[str, Any]) -> SyncReport:
        listed = self._image_series(client)
        selected: list[_SeriesRef] = []
        excluded: list[str] = []
        for ref in listed:
            why = self.selection.reason_to_exclude(ref.modality, ref.description, ref.count)
            (excluded.append(why) if why else selected.append(ref))
        studies = {ref.study for ref in selected}
        segs = [r for r in self._query(client, "/series", {"Modality": "SEG"}) if r.study in studies]
        selected_uids = {ref.series for ref in selected}

        entries: dict[str, dict[str, Any]] = state["series"]
        self.folder.mkdir(parents=True, exist_ok=True)
        fetched_series = fetched_instances = unchanged = 0
        for ref in [*selected, *segs]:
            key = _key(ref.series)
            sops = self._instance_uids(client, ref)
            entry = entries.get(key)
            if entry is not None and entry["sops"] == sops:
                needed = ref.modality != "SEG" or bool(selected_uids & set(entry["references"]))
                if not needed:
                    shutil.rmtree(self.folder / key, ignore_errors=True)
                    unchanged += 1
                    continue
                if self._complete(key, sops):
                    unchanged += 1
                    continue
            count, references = self._update_series(client, ref, key, sops)
            entries[key] = {"study": ref.study, "series": ref.series, "modality": ref.modality,
                            "sops": sops, "references": references}
            if ref.modality == "SEG" and not selected_uids & set(references):
                shutil.rmtree(self.folder / key, ignore_errors=True)  # labels another series
            self._write_state(state)
            fetched_series += int(count > 0 or entry is not None)
            fetched_instances += count

        wanted = {_key(ref.series) for ref in [*selected, *segs]}
        removed = [key for key in entries if key not in wanted]
        for key in removed:
            del entries[key]
        for child in self.folder.iterdir():  # removed series and leftovers of interrupted fetches
            if child.name not in entries:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        self._write_state(state)
        log.info("PACS %s: %d series selected of %d; %d fetched (%d instances), %d unchanged, "
                 "%d removed", self.url, len(selected), len(listed), fetched_series,
                 fetched_instances, unchanged, len(removed))
        return SyncReport(
            folder=self.folder, series_listed=len(listed), series_selected=len(selected),
            series_fetched=fetched_series, instances_fetched=fetched_instances,
            series_unchanged=unchanged, series_removed=len(removed), excluded=tuple(excluded),
        )

    # ------------------------------------------------------------------------------ requests

    def _client(self, credentials: PacsCredentials) -> httpx.Client:
        verify: Any = str(self.ca_file) if self.ca_file else True
        return httpx.Client(base_url=self.url, timeout=self.timeout_s, transport=self.transport,
                            verify=verify, **credentials.client_kwargs())

    def _check(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise PacsAuthError(
                f"the PACS at {self.url} refused the node's credentials (HTTP "
                f"{response.status_code} on {response.request.url.path}): check {ENV_USERNAME} "
                f"and {ENV_PASSWORD} (or {ENV_TOKEN}) in the SuperNode's environment",
                status=response.status_code,
            )
        if response.status_code >= 400:
            response.read()
            raise PacsError(f"the PACS at {self.url} answered HTTP {response.status_code} to "
                            f"{response.request.method} {response.request.url.path}: "
                            f"{response.text[:200]}", status=response.status_code)

    def _get_json(self, client: httpx.Client, path: str, params: dict[str, Any]) -> list[dict]:
        response = client.get(path, params=params, headers={"Accept": "application/dicom+json"})
        self._check(response)
        if response.status_code == 204 or not response.content:
            return []
        try:
            items = response.json()
        except ValueError as exc:
            raise PacsError(f"the PACS answered {path} with something that is not JSON") from exc
        if not isinstance(items, list):
            raise PacsError(f"the PACS answered {path} with a {type(items).__name__}, not a list")
        return items

    def _paged(self, client: httpx.Client, path: str, params: dict[str, Any]) -> Iterator[dict]:
        offset, seen = 0, set()
        while True:
            page = self._get_json(client, path, {**params, "limit": _PAGE, "offset": offset})
            fresh = [item for item in page if json.dumps(item, sort_keys=True) not in seen]
            seen.update(json.dumps(item, sort_keys=True) for item in fresh)
            yield from fresh
            if len(page) < _PAGE or not fresh:  # last page, or a server that ignores offset
                return
            offset += len(page)

    def _query(self, client: httpx.Client, path: str, params: dict[str, Any]) -> list[_SeriesRef]:
        fields = {"includefield": ["StudyInstanceUID", "SeriesDescription",
                                   "NumberOfSeriesRelatedInstances"]}
        refs = []
        for item in self._paged(client, path, {**params, **fields}):
            study, series = _value(item, _STUDY_UID), _value(item, _SERIES_UID)
            if not study or not series:
                continue
            count = _value(item, _N_INSTANCES)
            refs.append(_SeriesRef(str(study), str(series), str(_value(item, _MODALITY) or ""),
                                   str(_value(item, _DESCRIPTION) or ""),
                                   int(count) if count is not None else None))
        return refs

    def _image_series(self, client: httpx.Client) -> list[_SeriesRef]:
        if self.selection.modality:
            refs = [r for m in self.selection.modality
                    for r in self._query(client, "/series", {"Modality": m})]
        else:
            refs = self._query(client, "/series", {})
        unique = {r.series: r for r in refs if r.modality.upper() not in NON_IMAGE_MODALITIES}
        return sorted(unique.values(), key=lambda r: (r.study, r.series))

    def _instance_uids(self, client: httpx.Client, ref: _SeriesRef) -> list[str]:
        path = f"/studies/{quote(ref.study)}/series/{quote(ref.series)}/instances"
        return sorted({str(_value(i, _SOP_UID)) for i in self._paged(client, path, {})
                       if _value(i, _SOP_UID)})

    def _retrieve(self, client: httpx.Client, path: str, folder: Path) -> dict[str, list[str]]:
        """WADO-RS ``path`` into ``folder``: each instance's SOP UID -> its referenced series."""
        written: dict[str, list[str]] = {}
        with client.stream("GET", path, headers={"Accept": _ACCEPT_DICOM}) as response:
            self._check(response)
            boundary = boundary_of(response.headers.get("content-type", ""))
            for body in iter_parts(response.iter_bytes(), boundary):
                try:
                    ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
                except Exception as exc:  # the PACS sent something that is not DICOM
                    raise PacsError(f"the PACS sent a part of {path} that is not DICOM: {exc}") from exc
                sop = str(getattr(ds, "SOPInstanceUID", "") or "")
                if not sop:
                    raise PacsError(f"the PACS sent an instance of {path} without SOPInstanceUID")
                _write_atomic(folder / f"{_key(sop)}.dcm", body)
                written[sop] = [str(r.SeriesInstanceUID)
                                for r in getattr(ds, "ReferencedSeriesSequence", [])
                                if "SeriesInstanceUID" in r]
        return written

    def _update_series(
        self, client: httpx.Client, ref: _SeriesRef, key: str, sops: list[str]
    ) -> tuple[int, list[str]]:
        """Fetch what ``folder/key`` lacks of ``sops`` and drop the rest; (instances, refs)."""
        folder = self.folder / key
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {f"{_key(s)}.dcm": s for s in sops}
        for stale in folder.iterdir():
            if stale.name not in wanted:
                stale.unlink()
        missing = [s for name, s in wanted.items() if not (folder / name).is_file()]
        series_path = f"/studies/{quote(ref.study)}/series/{quote(ref.series)}"
        written: dict[str, list[str]] = {}
        if len(missing) * 2 > len(sops):  # most of it: one request for the series
            written = self._retrieve(client, series_path, folder)
        else:
            for sop in missing:
                written.update(self._retrieve(client, f"{series_path}/instances/{quote(sop)}", folder))
        references = sorted({r for refs in written.values() for r in refs})
        if ref.modality == "SEG" and not written:  # refs of SEG files fetched earlier
            references = sorted({str(r.SeriesInstanceUID) for f in folder.glob("*.dcm")
                                 for r in getattr(pydicom.dcmread(f, stop_before_pixels=True),
                                                  "ReferencedSeriesSequence", [])})
        return len(written), references

    # ------------------------------------------------------------------------------- state

    def _complete(self, key: str, sops: list[str]) -> bool:
        folder = self.folder / key
        return all((folder / f"{_key(s)}.dcm").is_file() for s in sops)

    def _read_state(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"format": _STATE_FORMAT, "url": self.url, "series": {}}
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return fresh
        if (not isinstance(state, dict) or state.get("format") != _STATE_FORMAT
                or state.get("url") != self.url or not isinstance(state.get("series"), dict)):
            return fresh  # another PACS or an old format: start over
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        _write_atomic(self.state_file, json.dumps(state, indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One sync at a time per cache (train and evaluate may overlap on a node)."""
        with open(self.cache_root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""A hospital node's ``site.toml``: its name, its data source and the rules selecting its series.

::

    [site]
    name = "hospital-a"                  # required
    # audit_log = "/var/log/fedseg/audit.jsonl"     (default $FEDSEG_HOME/audit/<name>.jsonl)
    # policy_file = "policy.toml"                   (default: policy.toml beside site.toml)
    # ledger_file, cache_dir ("none" disables the preprocessed cache)
    # node_key = "/etc/fedseg/keys/hospital-a.key"  the SuperNode's key: signs every reply

    [source]
    kind = "folder"                      # or "dicomweb"
    path = "/data/dicom"                 # folder: recursive, mixed series
    # url = "http://127.0.0.1:8042/dicom-web"    dicomweb (Orthanc's DICOMweb root)
    # cache_dir = "..."  ca_file = "..."  timeout_s = 60      dicomweb only

    [selection]                          # optional
    modality = ["MR"]
    series_description = "(?i)flair"     # regular expression, searched
    min_slices = 8

Relative paths are relative to the file's folder. PACS credentials never go here: they come
from the node's environment (``FEDSEG_PACS_USERNAME`` + ``FEDSEG_PACS_PASSWORD``, or
``FEDSEG_PACS_TOKEN``); a key that looks like a credential is refused.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imaging.errors import ConfigError
from imaging.home import fedseg_home
from imaging.selection import SeriesSelection

from .errors import SiteConfigError
from imaging.replies import SITE_NAME_PATTERN

from .site import Site
from .sources import DicomWebSource, FolderSource, SiteSource
from .sources.dicomweb import ENV_PASSWORD, ENV_TOKEN, ENV_USERNAME

__all__ = ["load_site_config", "parse_site_config", "SITE_NAME_PATTERN"]

_SECRET_KEY = re.compile(r"pass(word|wd)?|token|secret|credential|api_?key|auth|user(name)?", re.I)
_KEYS = {
    "site": {"name", "audit_log", "policy_file", "ledger_file", "cache_dir", "node_key"},
    "source": {"kind", "path", "url", "cache_dir", "ca_file", "timeout_s"},
    "selection": {"modality", "series_description", "min_slices"},
}
_SOURCE_KEYS = {"folder": {"kind", "path"}, "dicomweb": {"kind", "url", "cache_dir", "ca_file", "timeout_s"}}


def load_site_config(path: Path | str) -> Site:
    """Read ``site.toml`` into a :class:`~client.site.Site`.

    Raises
    ------
    SiteConfigError
        The file is missing, is not TOML, or holds a missing, unknown or bad value (the
        message names the key), or a credential.
    """
    path = Path(path).expanduser()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteConfigError(f"site config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteConfigError(f"site config {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"site config {path} is not valid TOML: {exc}") from exc
    return parse_site_config(doc, base_dir=path.resolve().parent, config_file=path.resolve())


def _refuse_credentials(doc: Mapping[str, Any], where: str = "") -> None:
    for key, value in doc.items():
        if _SECRET_KEY.search(str(key)):
            raise SiteConfigError(
                f"site config key {where}{key!r} looks like a credential: credentials never go in "
                f"site.toml; set {ENV_USERNAME} and {ENV_PASSWORD} (or {ENV_TOKEN}) in the "
                "SuperNode's environment"
            )
        if isinstance(value, Mapping):
            _refuse_credentials(value, f"{where}{key}.")


def _table(doc: Mapping[str, Any], name: str, required: bool) -> Mapping[str, Any]:
    table = doc.get(name)
    if table is None:
        if required:
            raise SiteConfigError(f"site config lacks the [{name}] table")
        return {}
    if not isinstance(table, Mapping):
        raise SiteConfigError(f"site config [{name}] must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - _KEYS[name])
    if unknown:
        raise SiteConfigError(f"site config [{name}] has unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_KEYS[name]))}")
    return table


def _str(table: Mapping[str, Any], section: str, key: str, required: bool = False) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise SiteConfigError(f"site config [{section}] lacks {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise SiteConfigError(f"site config [{section}] {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _path(table: Mapping[str, Any], section: str, key: str, base: Path) -> Path | None:
    raw = _str(table, section, key)
    if raw is None:
        return None
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base / path


def _selection(table: Mapping[str, Any]) -> SeriesSelection:
    modality = table.get("modality", [])
    if isinstance(modality, str):
        modality = [modality]
    if not isinstance(modality, list) or not all(isinstance(m, str) for m in modality):
        raise SiteConfigError(f"site config [selection] modality must be a string or a list of "
                              f"strings, got {modality!r}")
    description = table.get("series_description")
    if description is not None and not isinstance(description, str):
        raise SiteConfigError(f"site config [selection] series_description must be a string "
                              f"(a regular expression), got {description!r}")
    min_slices = table.get("min_slices", 0)
    if not isinstance(min_slices, int) or isinstance(min_slices, bool):
        raise SiteConfigError(f"site config [selection] min_slices must be an integer, got {min_slices!r}")
    try:
        return SeriesSelection(tuple(modality), description, min_slices)
    except ConfigError as exc:
        raise SiteConfigError(f"site config [selection]: {exc}") from exc


def _source(table: Mapping[str, Any], name: str, base: Path, selection: SeriesSelection) -> SiteSource:
    kind = _str(table, "source", "kind", required=True)
    if kind not in _SOURCE_KEYS:
        raise SiteConfigError(f"site config [source] kind must be 'folder' or 'dicomweb', got {kind!r}")
    extra = sorted(set(table) - _SOURCE_KEYS[kind])
    if extra:
        raise SiteConfigError(f"site config [source] key(s) {', '.join(extra)} do not apply to "
                              f"kind = {kind!r}")
    if kind == "folder":
        folder = _path(table, "source", "path", base)
        if folder is None:
            raise SiteConfigError("site config [source] kind = 'folder' needs path = '/data/dicom'")
        return FolderSource(folder, selection)
    url = _str(table, "source", "url")
    if url is None:
        raise SiteConfigError("site config [source] kind = 'dicomweb' needs url = "
                              "'http://pacs:8042/dicom-web'")
    timeout = table.get("timeout_s", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise SiteConfigError(f"site config [source] timeout_s must be a positive number, got {timeout!r}")
    cache_root = (_path(table, "source", "cache_dir", base)
                  or fedseg_home() / "cache" / "dicomweb" / name)
    return DicomWebSource(url, cache_root=cache_root, selection=selection,
                          ca_file=_path(table, "source", "ca_file", base), timeout_s=float(timeout))


def parse_site_config(
    doc: Mapping[str, Any], *, base_dir: Path, config_file: Path | None = None
) -> Site:
    """Build a :class:`~client.site.Site` from a parsed ``site.toml`` (see the module docstring).

    Parameters
    ----------
    doc : Mapping
        The parsed TOML.
    base_dir : Path
        The folder relative paths are relative to (the config file's folder).
    config_file : Path, optional
        The file, recorded on the site.

    Raises
    ------
    SiteConfigError
        A missing, unknown or bad value, or a credential.
    """
    _refuse_credentials(doc)
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise SiteConfigError(f"site config has unknown table(s) {', '.join(unknown)}; "
                              "known: [site], [source], [selection]")
    site = _table(doc, "site", required=True)
    name = _str(site, "site", "name", required=True)
    assert name is not None
    if not SITE_NAME_PATTERN.match(name):
        raise SiteConfigError(f"site config [site] name {name!r} must be 1-64 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")
    selection = _selection(_table(doc, "selection", required=False))
    source = _source(_table(doc, "source", required=True), name, base_dir, selection)
    data_dir = source.folder if isinstance(source, DicomWebSource) else Path(source.path)
    cache_raw = _str(site, "site", "cache_dir")
    if cache_raw is not None and cache_raw.lower() == "none":
        cache_dir = None
    else:
        cache_dir = _path(site, "site", "cache_dir", base_dir) or fedseg_home() / "cache" / "site-datasets"
    return Site(
        data_dir=data_dir,
        name=name,
        cache_dir=cache_dir,
        policy_file=_path(site, "site", "policy_file", base_dir) or base_dir / "policy.toml",
        ledger_file=_path(site, "site", "ledger_file", base_dir),
        source=source,
        audit_file=_path(site, "site", "audit_log", base_dir),
        config_file=config_file,
        node_key=_path(site, "site", "node_key", base_dir),
    )

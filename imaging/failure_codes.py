"""The failure codes a site sends: every error that leaves a site is one of these, and nothing else.

A ClientApp whose round fails replies with ``<CODE>: <message>; ref <ref>``. The message is built
from the code's template with allow-listed values only: counts, numbers, policy rule names
(``[section] key``), words from a fixed vocabulary, and ``ref``, a random reference under which
the site's own log and audit log keep the full text. :func:`render_failure` refuses any other
value; :func:`parse_failure` is its exact inverse, so the coordinator can keep a reply's error
text only when it is one of these (``server`` withholds anything else).

The catalogue lives here, not in ``client``, because both ends read it: the site renders, the
coordinator parses. README's hospital-IT section lists every code with what to do about it.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ImagingError

__all__ = [
    "FAILURE_CODES",
    "FailureCode",
    "ParsedFailure",
    "PROBLEM_KINDS",
    "UnsafeFailureValue",
    "new_failure_ref",
    "parse_failure",
    "render_failure",
    "rule_name",
]


class UnsafeFailureValue(ImagingError, ValueError):
    """A value that a failure template does not allow (free text, a path, a UID...)."""


#: Why a file or series was left out (``imaging.site_folder.FileProblem.kind``).
PROBLEM_KINDS = (
    "not-dicom",                    # not a DICOM file at all
    "unreadable",                   # DICOM that cannot be read (truncated, corrupt, no pixels)
    "unsupported-transfer-syntax",  # compressed with a codec no installed decoder handles
    "not-an-image",                 # a DICOM object that is neither an image nor a SEG
    "multi-frame",                  # multi-frame images are not supported
    "series-inconsistent",          # instances that do not form one series
    "seg-misaligned",               # a SEG that does not fit its series (UIDs, frames, size)
    "seg-unusable",                 # a SEG that cannot be read
    "seg-ambiguous",                # a SEG that references no series or several
    "seg-extra",                    # a second SEG for a series (the first is used)
    "seg-orphan",                   # a SEG whose series is not at the site
)
_IDENT = r"[a-z][a-z0-9_-]{0,39}"
_RULE = re.compile(rf"^\[(?P<section>{_IDENT})\](?: (?P<key>{_IDENT}))?$")
_DOTTED_RULE = re.compile(rf"^(?P<section>{_IDENT})(?:\.(?P<key>{_IDENT}))?$")
_REF = re.compile(r"^[0-9a-f]{12}$")


def rule_name(rule: object) -> str:
    """``privacy.require_dp`` or ``[privacy] require_dp`` as ``[privacy] require_dp``.

    Any lower-case ``section`` / ``section.key`` of identifiers is accepted (the policy grows
    sections and keys); anything else raises :class:`UnsafeFailureValue`. Rule names come from
    the code that raises a refusal (``PolicyViolation(rule=...)``), never from the site's data.
    """
    if not isinstance(rule, str):
        raise UnsafeFailureValue(f"a policy rule name is a string, got {type(rule).__name__}")
    text = rule.strip()
    match = _RULE.match(text) or _DOTTED_RULE.match(text)
    if match is None:
        raise UnsafeFailureValue(f"not a policy rule name ([section] key): {len(text)} characters refused")
    section, key = match.group("section"), match.group("key")
    return f"[{section}] {key}" if key else f"[{section}]"


# ------------------------------------------------------------------------- field kinds


class _Field:
    pattern: str

    def render(self, value: Any) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        raise NotImplementedError


class _Count(_Field):
    pattern = r"\d{1,12}"

    def render(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**12:
            raise UnsafeFailureValue(f"a count must be a non-negative int, got {type(value).__name__}")
        return str(value)

    def parse(self, text: str) -> int:
        return int(text)


class _Number(_Field):
    pattern = r"-?[0-9][0-9.e+-]{0,15}"

    def render(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UnsafeFailureValue(f"a number must be finite, got {type(value).__name__}")
        return f"{float(value):.4g}"

    def parse(self, text: str) -> float:
        return float(text)


class _Rule(_Field):
    pattern = rf"\[{_IDENT}\](?: {_IDENT})?"

    def render(self, value: Any) -> str:
        return rule_name(value)

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class _Label(_Field):
    words: tuple[str, ...]

    @property
    def pattern(self) -> str:  # type: ignore[override]
        return "(?:" + "|".join(map(re.escape, self.words)) + ")"

    def render(self, value: Any) -> str:
        if value not in self.words:
            raise UnsafeFailureValue(f"not one of the allowed words {list(self.words)}")
        return str(value)

    def parse(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class _LabelCounts(_Field):
    """``{"not-dicom": 3, "seg-misaligned": 1}`` as ``not-dicom 3, seg-misaligned 1`` (or ``none``)."""

    words: tuple[str, ...]

    @property
    def pattern(self) -> str:  # type: ignore[override]
        one = "(?:" + "|".join(map(re.escape, self.words)) + r") \d{1,12}"
        return f"(?:none|{one}(?:, {one})*)"

    def render(self, value: Any) -> str:
        if not isinstance(value, Mapping):
            raise UnsafeFailureValue("counts by kind must be a mapping")
        parts = []
        for word in sorted(value):
            if word not in self.words:
                raise UnsafeFailureValue(f"not one of the allowed words {list(self.words)}")
            parts.append(f"{word} {_Count().render(value[word])}")
        return ", ".join(parts) or "none"

    def parse(self, text: str) -> dict[str, int]:
        if text == "none":
            return {}
        return {word: int(n) for word, n in (part.rsplit(" ", 1) for part in text.split(", "))}


class _Digest(_Field):
    """A SHA-256 of something public (an app package), or ``unknown``."""

    pattern = r"(?:[0-9a-f]{64}|unknown)"

    def render(self, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(self.pattern, value):
            raise UnsafeFailureValue("a digest is 64 lower-case hex digits or 'unknown'")
        return value

    def parse(self, text: str) -> str:
        return text


COUNT, NUMBER, RULE, DIGEST = _Count(), _Number(), _Rule(), _Digest()


# ------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class FailureCode:
    """One code: its template (``{name}`` placeholders), what each value may be, and the docs."""

    code: str
    template: str
    meaning: str
    action: str
    fields: Mapping[str, _Field] = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = set(re.findall(r"\{(\w+)\}", self.template))
        if named != set(self.fields):
            raise ValueError(f"{self.code}: template fields {sorted(named)} != {sorted(self.fields)}")

    def render(self, *, ref: str, **values: Any) -> str:
        """The text that may leave the site; :class:`UnsafeFailureValue` for any other value."""
        if set(values) != set(self.fields):
            raise UnsafeFailureValue(f"{self.code} takes {sorted(self.fields)}, got {sorted(values)}")
        if not isinstance(ref, str) or not _REF.match(ref):
            raise UnsafeFailureValue("ref must be 12 lower-case hex digits (new_failure_ref)")
        rendered = {name: kind.render(values[name]) for name, kind in self.fields.items()}
        return f"{self.code}: {self.template.format(**rendered)}; ref {ref}"

    @property
    def regex(self) -> re.Pattern[str]:
        parts = re.split(r"(\{\w+\})", self.template)
        body = "".join(f"(?P<{p[1:-1]}>{self.fields[p[1:-1]].pattern})" if p.startswith("{") else re.escape(p)
                       for p in parts)
        return re.compile(rf"{re.escape(self.code)}: {body}; ref (?P<ref>[0-9a-f]{{12}})")


def _code(code: str, template: str, meaning: str, action: str, **fields: _Field) -> FailureCode:
    return FailureCode(code, template, meaning, action, fields)


_PROBLEMS = _LabelCounts(PROBLEM_KINDS)

FAILURE_CODES: Mapping[str, FailureCode] = {c.code: c for c in (
    _code("FEDSEG-POLICY-001", "refused by site policy rule {rule}",
          "the round asks for something the site's policy.toml forbids",
          "operator: change the run to meet the rule, or ask the site; site IT: the audit log's "
          "refusal line (same ref) has the detail", rule=RULE),
    _code("FEDSEG-APP-001",
          "the site's runner refused this app package before running it (rule {rule}); "
          "FAB sha256 {fab_sha256}, content sha256 {content_sha256}, {signed}",
          "the site's runner (`fedseg site runner`) found the package outside the policy's [apps] "
          "rules (or no policy, or no [apps] rule): none of its code ran",
          "operator: send the package the site approved; site IT: allow its content hash "
          "(`fedseg site app-hash`) or its publisher's key",
          rule=RULE, fab_sha256=DIGEST, content_sha256=DIGEST, signed=_Label(("signed", "not signed"))),
    _code("FEDSEG-POLICY-002", "the site's policy file cannot be read or holds a bad value",
          "policy.toml is malformed: the site takes part in no round until it is fixed",
          "site IT: `fedseg site check` names the problem"),
    _code("FEDSEG-PRIVACY-001",
          "refused by site policy rule {rule}: the round would spend epsilon {projected} of {budget} "
          "({remaining} left)",
          "the round would take the site's cumulative epsilon above its budget",
          "operator: fewer rounds or more noise; site IT: `fedseg site ledger show`",
          rule=RULE, projected=NUMBER, budget=NUMBER, remaining=NUMBER),
    _code("FEDSEG-PRIVACY-002", "the round's differential-privacy settings cannot be used at this site",
          "DP-SGD cannot be set up with the round's settings (missing or contradictory values)",
          "operator: check noise-multiplier / target-epsilon / max-grad-norm in the run config"),
    _code("FEDSEG-PRIVACY-003", "the site's privacy ledger cannot be read or written",
          "the ledger file is unreadable, corrupt or not writable: no DP round runs",
          "site IT: `fedseg site ledger show`; restore it from backup, never delete it"),
    _code("FEDSEG-PRIVACY-004",
          "refused by site policy rule {rule}: the site's privacy ledger lost recorded history",
          "the ledger's hash chain is broken or behind the head anchored in the audit log (deleted, "
          "truncated or rolled back): no DP round runs, the budget is never reset",
          "site IT: `fedseg site ledger verify`; restore the ledger from backup", rule=RULE),
    _code("FEDSEG-SITE-001", "the node's site configuration is invalid",
          "site.toml or the node config names no usable data source or settings",
          "site IT: `fedseg site check --config site.toml`"),
    _code("FEDSEG-AUDIT-001", "the site's audit log cannot be written or its hash chain is broken",
          "the site refuses to work without its audit trail",
          "site IT: `fedseg site audit verify`; free disk space or restore the file"),
    _code("FEDSEG-ROUND-001", "the round's instructions are invalid or incomplete",
          "the message from the coordinator lacks a value or holds one out of range",
          "operator: check the run config against the app version the sites run"),
    _code("FEDSEG-DATA-001",
          "no usable labelled series: {labelled} labelled, {unlabelled} without a SEG, {excluded} "
          "excluded by the selection rules; {unusable} files or series not usable ({problems})",
          "the site has nothing to train or evaluate on",
          "site IT: `fedseg site check` lists the files left out and why",
          labelled=COUNT, unlabelled=COUNT, excluded=COUNT, unusable=COUNT, problems=_PROBLEMS),
    _code("FEDSEG-DATA-002", "no {role} patients after the split: {patients} patients with labelled series",
          "too few patients for the train/test split",
          "operator: lower test-fraction; site IT: add labelled patients",
          role=_Label(("training", "held-out")), patients=COUNT),
    _code("FEDSEG-DATA-003", "the site's data cannot be used",
          "the site's DICOM could not be prepared for the round",
          "site IT: `fedseg site check`, then the site log (same ref)"),
    _code("FEDSEG-SOURCE-001", "the site's DICOM folder is missing or not a folder",
          "the folder named in site.toml is not there (unmounted share?)",
          "site IT: mount or fix the path; `fedseg site check`"),
    _code("FEDSEG-PACS-001", "the PACS cannot be reached and nothing is cached",
          "a network or TLS error talking to the PACS, before any series was fetched",
          "site IT: network, DNS, TLS CA (`ca-file`) of the DICOMweb url"),
    _code("FEDSEG-PACS-002", "the PACS answered HTTP {status}",
          "the PACS answered a DICOMweb request with an error",
          "site IT: the PACS's own log; the site log (same ref) names the request",
          status=COUNT),
    _code("FEDSEG-PACS-003", "the PACS refused the node's credentials (HTTP {status})",
          "401/403 from the PACS",
          "site IT: FEDSEG_PACS_USERNAME / FEDSEG_PACS_PASSWORD (or FEDSEG_PACS_TOKEN) in the SuperNode's environment",
          status=COUNT),
    _code("FEDSEG-PACS-004", "the PACS sent an answer that cannot be used",
          "a malformed DICOMweb answer (not JSON, truncated multipart, a part that is not DICOM)",
          "site IT: the PACS's DICOMweb plug-in and any proxy in between"),
    _code("FEDSEG-INTERNAL", "unexpected error, see the site log",
          "anything else (a crash in training, a bug): its text never leaves the site",
          "site IT: the site log and the audit log's failure line (same ref); report it with the ref"),
)}


@dataclass(frozen=True)
class ParsedFailure:
    code: FailureCode
    values: dict[str, Any]
    ref: str


def new_failure_ref() -> str:
    """A fresh random reference (12 hex digits): it names a failure without describing it."""
    return secrets.token_hex(6)


def render_failure(code: str, *, ref: str, **values: Any) -> str:
    """``FAILURE_CODES[code].render(ref=ref, **values)``; :class:`UnsafeFailureValue` when refused."""
    if code not in FAILURE_CODES:
        raise UnsafeFailureValue("unknown failure code")
    return FAILURE_CODES[code].render(ref=ref, **values)


def parse_failure(text: str) -> ParsedFailure | None:
    """The code, values and ref of a text that :func:`render_failure` produced; None otherwise."""
    if not isinstance(text, str) or len(text) > 1000:
        return None
    code = FAILURE_CODES.get(text.split(":", 1)[0])
    match = code.regex.fullmatch(text) if code else None
    if code is None or match is None:
        return None
    try:
        values = {name: kind.parse(match.group(name)) for name, kind in code.fields.items()}
        if code.render(ref=match.group("ref"), **values) != text:  # canonical form only
            return None
    except (UnsafeFailureValue, ValueError):
        return None
    return ParsedFailure(code, values, match.group("ref"))

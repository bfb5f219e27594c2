"""The site's audit log: append-only, hash-chained JSON lines, one per event.

Every line is a JSON object with ``seq`` (1, 2, ...), ``time`` (UTC, ISO 8601), ``event``,
``prev`` (the previous line's ``hash``; 64 zeros for the first) and the event's own fields, and
``hash``: the SHA-256 of the line's canonical JSON (sorted keys, no spaces, ASCII) without
``hash``. Editing, removing, inserting or reordering a line breaks the chain at that line or
the next; :func:`verify_audit_log` names the first bad line. Deleting whole lines from the *end*
leaves a valid shorter chain: ship the head (``seq`` and ``hash``, printed by ``verify``) to
somewhere the node cannot rewrite (syslog, a ticket) and compare with ``--expect-head``.

Events written by the ClientApp (aggregate facts and hashes only, never a name, an ID or a
path of a patient's file, except in the ``reason`` of a refusal or failure, which is the full
text of the error: the audit log is the site's own and is never sent):

``run``          first message of a run: run id, the app's identity, the policy in force
``round-start``  a train or evaluate message arrives: run, round, what it asks for
``data-access``  the site's data was read: manifest SHA-256, series, slices (train/test)
``round-result`` the reply sent: the metric values that left the site, keys dropped by policy
``refusal``      the policy refused the round: the rule, the ``code``/``ref``/``sent`` text that
                 left (``client.failures``) and the full ``reason``
``failure``      the round failed for another reason: the error type, code, ref, sent, reason
``app-identified`` the app's hashes, when the policy came to restrict apps during a run
``admitted``     a message passed every check and is about to read data: run, round, kind and
                 ``count``, its ordinal among the run's messages of that kind (the policy's
                 ``max_rounds`` and ``max_evaluations`` count these)
``ledger-anchor`` the privacy ledger's head after a DP round (``entries``, ``head``): a ledger
                 that no longer holds an anchored head is refused (see ``client.ledger_anchor``)

Events written by the site runner (:mod:`client.site_runner`), before any app code runs:

``runner-start``  the runner started: the policy file and its SHA-256, the flwr version
``app-verified``  a task's app package was allowed: run, round, kind, the rule, its hashes
``refusal``       (``by: site-runner``) a task's package was refused: the rule, the reason, its hashes

Writers take an exclusive ``fcntl`` lock on the file for read-last-line + append + fsync, so
concurrent ClientApp processes of one node never interleave or fork the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from imaging.home import fedseg_home

from .errors import AuditError

__all__ = [
    "AuditLog",
    "AuditReport",
    "GENESIS",
    "default_audit_path",
    "line_hash",
    "verify_audit_log",
]

GENESIS = "0" * 64
_RESERVED = {"seq", "time", "event", "prev", "hash"}


def default_audit_path(site_name: str) -> Path:
    """``$FEDSEG_HOME/audit/<site-name>.jsonl``."""
    return fedseg_home() / "audit" / f"{site_name}.jsonl"


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def line_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON, ``hash`` itself left out."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _last_line(fh: IO[bytes]) -> bytes:
    """The file's last line (without its newline); b"" for an empty file."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return b""
    block, pos, tail = 4096, end, b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        tail = fh.read(step) + tail
        body = tail[:-1] if tail.endswith(b"\n") else tail
        if b"\n" in body or pos == 0:
            break
    if not tail.endswith(b"\n"):
        raise AuditError("the audit log ends with an incomplete line (a write was cut off); "
                         "run `fedseg site audit verify` and have the site's IT repair it")
    return tail[:-1].rsplit(b"\n", 1)[-1]


class AuditLog:
    """An append-only, hash-chained JSON-lines file.

    Parameters
    ----------
    path : Path
        The log file; its folder is created (0700) on the first write.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[IO[bytes]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _append_locked(fh: IO[bytes], event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        clash = _RESERVED & set(fields)
        if clash:
            raise AuditError(f"audit fields {sorted(clash)} are reserved")
        last = _last_line(fh)
        if last:
            try:
                previous = json.loads(last)
                seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError("the audit log's last line is not an audit record; "
                                 "run `fedseg site audit verify`") from exc
        else:
            seq, prev = 1, GENESIS
        record: dict[str, Any] = {
            "seq": seq,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "prev": prev,
            **fields,
        }
        record["hash"] = line_hash(record)
        fh.seek(0, os.SEEK_END)
        fh.write(_canonical(record) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
        return record

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (fields must be JSON values) and return the written record."""
        with self._locked() as fh:
            return self._append_locked(fh, event, fields)

    def append_once(self, event: str, match: Mapping[str, Any], **fields: Any) -> dict[str, Any] | None:
        """Append ``event`` unless a record of that event with the ``match`` fields exists.

        Check and append happen under one lock. Returns the new record, or None when one was
        already there.
        """
        with self._locked() as fh:
            if self._find(fh, event, match) is not None:
                return None
            return self._append_locked(fh, event, {**match, **fields})

    def append_if_fewer(self, event: str, match: Mapping[str, Any], limit: int | None,
                        **fields: Any) -> dict[str, Any] | None:
        """Append ``event`` with ``count`` (its ordinal among records of ``event`` with the
        ``match`` fields) unless ``limit`` of them exist already; None then (nothing written).

        Count and append happen under one lock, so concurrent ClientApp processes never both
        take the last place. ``limit=None``: no limit, the record is always written.
        """
        with self._locked() as fh:
            count = len(self._find_all(fh, event, match))
            if limit is not None and count >= limit:
                return None
            return self._append_locked(fh, event, {**match, **fields, "count": count + 1})

    def find_all(self, event: str, match: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every record of ``event`` whose fields equal ``match``, in order (read under the lock)."""
        if not self.path.is_file():
            return []
        with self._locked() as fh:
            return self._find_all(fh, event, match or {})

    @staticmethod
    def _find_all(fh: IO[bytes], event: str, match: Mapping[str, Any]) -> list[dict[str, Any]]:
        fh.seek(0)
        found = []
        needle = json.dumps(event).encode()  # cheap pre-filter: the event's name as it is written
        for raw in fh:
            if needle not in raw:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                found.append(record)
        return found

    def find(self, event: str, match: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first record of ``event`` whose fields equal ``match``, or None."""
        if not self.path.is_file():
            return None
        with self._locked() as fh:
            return self._find(fh, event, match)

    @classmethod
    def _find(cls, fh: IO[bytes], event: str, match: Mapping[str, Any]) -> dict[str, Any] | None:
        found = cls._find_all(fh, event, match)
        return found[0] if found else None

    def records(self) -> list[dict[str, Any]]:
        """Every record, in order (no verification: see :func:`verify_audit_log`)."""
        if not self.path.is_file():
            return []
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except ValueError as exc:
            raise AuditError(f"{self.path} holds a line that is not JSON: {exc}") from exc


@dataclass(frozen=True)
class AuditReport:
    """The outcome of :func:`verify_audit_log`; ``bad_line`` is 1-based, 0 when all is well."""

    path: str
    lines: int
    ok: bool
    bad_line: int = 0
    reason: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "ok": self.ok, "bad_line": self.bad_line,
                "reason": self.reason, "head": {"seq": self.head_seq, "hash": self.head_hash}}


def verify_audit_log(path: Path, expect_head: str | None = None) -> AuditReport:
    """Check every line's hash and the chain; name the first line that breaks it.

    Parameters
    ----------
    path : Path
        The audit log.
    expect_head : str, optional
        ``SEQ:HASH`` recorded earlier somewhere safe: that record must still be in the chain
        (catches lines deleted from the end).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror or exc}") from exc
    raw_lines = data.split(b"\n")
    truncated = bool(data) and not data.endswith(b"\n")
    if not truncated:
        raw_lines = raw_lines[:-1]
    total = len(raw_lines)

    def bad(number: int, reason: str, seq: int, head: str) -> AuditReport:
        return AuditReport(str(path), total, False, number, reason, seq, head)

    prev_hash, prev_seq = GENESIS, 0
    for number, raw in enumerate(raw_lines, start=1):
        if truncated and number == total:
            return bad(number, "incomplete last line (the log was truncated or a write was cut off)",
                       prev_seq, prev_hash)
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return bad(number, f"not a JSON audit record ({exc})", prev_seq, prev_hash)
        missing = {"seq", "prev", "hash", "event", "time"} - set(record)
        if missing:
            return bad(number, f"lacks {sorted(missing)}", prev_seq, prev_hash)
        if record["hash"] != line_hash(record):
            return bad(number, "its content does not match its hash (the line was edited)",
                       prev_seq, prev_hash)
        if record["prev"] != prev_hash:
            return bad(number, "its prev hash is not the hash of the line before it "
                               "(a line was removed, inserted or moved)", prev_seq, prev_hash)
        if record["seq"] != prev_seq + 1:
            return bad(number, f"seq {record['seq']} follows seq {prev_seq} "
                               "(a line was removed, inserted or moved)", prev_seq, prev_hash)
        prev_hash, prev_seq = record["hash"], int(record["seq"])
        if expect_head and expect_head == f"{prev_seq}:{prev_hash}":
            expect_head = None
    if expect_head:
        return AuditReport(str(path), total, False, total + 1,
                           f"the expected head {expect_head} is not in the chain "
                           "(lines were deleted from the end, or the log was replaced)",
                           prev_seq, prev_hash)
    return AuditReport(str(path), total, True, 0, "", prev_seq, prev_hash)

"""The durable per-site privacy ledger.

One JSON file per site records every DP-SGD training the site ran on its data. Entries belong to
a **budget scope** that the site chooses (its policy's ``[privacy] budget_scope``, default
``"site"``: everything the node trains on), never to what a run calls its consortium or model:
those are kept in each entry for the record only, so renaming them spends the same budget. ε is
never stored: it is recomposed from all recorded ``(noise_multiplier, sample_rate, steps)`` of a
scope with one fresh Opacus accountant, which is what the site has spent (a PrivacyEngine per
round only knows its own round).

δ policy: a scope has one δ, the smallest one recorded (a scope migrated from several version-1
histories may hold several; composing at the smallest is the conservative choice).
:meth:`PrivacyLedger.record` refuses an entry whose δ differs from it, and the read methods
refuse another δ (:class:`~privacy.errors.LedgerError`): the site's budget is one ``(ε, δ)``
pair per scope.

File format (version 2)::

    {"format": "fedseg-privacy-ledger", "version": 2,
     "entries": [{<entry fields>, "prev": "<hash of the entry before>", "hash": "<sha256>"}, ...]}

The entries form a hash chain: ``hash`` is the SHA-256 of the entry's canonical JSON (sorted
keys, no spaces, ASCII) without ``hash``, and ``prev`` the previous entry's hash (64 zeros for
the first). An edited entry breaks the chain and the ledger is refused. A chain rewritten
wholesale, truncated or deleted is caught by a :class:`LedgerAnchor`: after each write the
ledger hands its new head (entry count and hash) to the anchor (the site's audit log, see
``client.ledger_anchor``), and every load checks that each anchored head is still in the chain
(:class:`~privacy.errors.LedgerIntegrityError` otherwise). A ledger never silently resets.

A version-1 file (``{"ledgers": {"<consortium>": {"<model>": [...]}}}``, keyed by what the runs
called themselves) is read as version 2: every entry, oldest first, joins the ``"site"`` scope,
so all of its history still counts; it is rewritten as version 2 at the next record.

Writes go to a temporary file in the same folder, are fsync'ed, then ``os.replace``'d over the
ledger (and the folder fsync'ed): a crash leaves the old or the new file, never a torn one. A
lock (a per-path thread lock plus ``fcntl.flock`` on ``<path>.lock`` where available) makes
read-modify-write (and the anchor that follows it) safe between threads and processes. Every
call re-reads the file, so a restarted process sees what was recorded before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, cast

from .accounting import compose_epsilon
from .config import Accountant
from .errors import BudgetExceededError, LedgerError, LedgerIntegrityError, PrivacyConfigError

try:  # POSIX: also serialise writers in other processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_SCOPE",
    "GENESIS",
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "LedgerAnchor",
    "LedgerEntry",
    "LedgerHead",
    "LedgerReport",
    "PrivacyLedger",
    "entry_hash",
    "verify_ledger",
]

LEDGER_FORMAT = "fedseg-privacy-ledger"
LEDGER_VERSION = 2
DEFAULT_SCOPE = "site"
GENESIS = "0" * 64
_ACCOUNTANTS = ("rdp", "prv")
_SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHAIN_FIELDS = ("prev", "hash")


@dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD training of a site (one round, or one retry of it).

    Every training must be recorded, retries included: each one spends privacy. ``consortium``
    and ``model`` are what the run called itself, kept for the record; they do not scope ε.
    """

    scope: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: Accountant
    time: str
    consortium: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.scope, str) or not _SCOPE.match(self.scope):
            problems.append(f"scope must be a name of letters, digits, '.', '_' or '-', got {self.scope!r}")
        if not isinstance(self.run_id, str) or not self.run_id:
            problems.append(f"run_id must be a non-empty string, got {self.run_id!r}")
        if not _is_int(self.round) or self.round < 0:
            problems.append(f"round must be an integer >= 0, got {self.round!r}")
        if not _is_number(self.noise_multiplier) or self.noise_multiplier <= 0:
            problems.append(f"noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        if not _is_number(self.sample_rate) or not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must lie in (0, 1], got {self.sample_rate!r}")
        if not _is_int(self.steps) or self.steps < 0:
            problems.append(f"steps must be an integer >= 0, got {self.steps!r}")
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            problems.append(f"delta must lie in (0, 1), got {self.delta!r}")
        if self.accountant not in _ACCOUNTANTS:
            problems.append(f"accountant must be one of {list(_ACCOUNTANTS)}, got {self.accountant!r}")
        for name in ("time", "consortium", "model"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, got {getattr(self, name)!r}")
        if problems:
            raise PrivacyConfigError("invalid ledger entry: " + "; ".join(problems))

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """The Opacus accountant history triple ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"entry must have exactly the keys {sorted(names)}, got {data!r}")
        return cls(**data)


@dataclass(frozen=True)
class LedgerHead:
    """Where the chain ends: how many entries it holds and the last one's hash."""

    entries: int
    hash: str = GENESIS

    def __str__(self) -> str:
        return f"{self.entries}:{self.hash}"


class LedgerAnchor(Protocol):
    """Somewhere the ledger's heads are kept apart from the ledger (the site's audit log)."""

    def anchored(self) -> Sequence[LedgerHead]:
        """Every head anchored so far, oldest first."""
        ...

    def anchor(self, head: LedgerHead) -> None:
        """Keep ``head``, the ledger's head after a write."""
        ...


@dataclass(frozen=True)
class LedgerReport:
    """The outcome of :func:`verify_ledger`."""

    ok: bool
    exists: bool
    version: int
    head: LedgerHead | None
    anchors: int
    last_anchor: LedgerHead | None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "exists": self.exists, "version": self.version, "reason": self.reason,
            "head": asdict(self.head) if self.head else None, "anchors": self.anchors,
            "last_anchor": asdict(self.last_anchor) if self.last_anchor else None,
        }


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def entry_hash(stored: dict[str, Any]) -> str:
    """SHA-256 of a stored entry's canonical JSON, ``hash`` itself left out."""
    return hashlib.sha256(_canonical({k: v for k, v in stored.items() if k != "hash"})).hexdigest()


def _chained(entries: list[LedgerEntry]) -> list[dict[str, Any]]:
    stored, prev = [], GENESIS
    for entry in entries:
        item = {**entry.to_dict(), "prev": prev}
        item["hash"] = prev = entry_hash(item)
        stored.append(item)
    return stored


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _scope_name(scope: str) -> str:
    if not isinstance(scope, str) or not _SCOPE.match(scope):
        raise PrivacyConfigError(
            f"budget scope must be 1-64 letters, digits, '.', '_' or '-', got {scope!r}"
        )
    return scope


def verify_ledger(path: str | os.PathLike[str], anchor: LedgerAnchor | None = None) -> LedgerReport:
    """Check the ledger's chain and its anchored heads without raising (``fedseg site ledger
    verify``); ``reason`` says what is wrong."""
    path = Path(path)
    anchors = list(anchor.anchored()) if anchor is not None else []
    last = max(anchors, key=lambda h: h.entries) if anchors else None
    try:
        ledger = PrivacyLedger(path, anchor)
        doc = ledger._document()
    except LedgerError as exc:
        return LedgerReport(False, path.is_file(), 0, None, len(anchors), last, str(exc))
    return LedgerReport(True, path.is_file(), int(doc.get("migrated_from", LEDGER_VERSION)),
                        ledger._head(doc), len(anchors), last)


class PrivacyLedger:
    """A site's durable record of DP-SGD training, and its budget checks.

    Parameters
    ----------
    path : str or os.PathLike
        The site's ledger file (one per site); created on the first :meth:`record`.
    anchor : LedgerAnchor or None
        Where the ledger's heads are anchored. With it, every load refuses a ledger that no
        longer holds an anchored head (deleted, truncated, rolled back, rewritten), and every
        record anchors the new head. Without it only the chain itself is checked.

    Raises
    ------
    LedgerIntegrityError
        At construction and at every later read, when the chain is broken or an anchored head
        is missing.
    """

    _path_locks: dict[str, threading.RLock] = {}
    _path_locks_guard = threading.Lock()

    def __init__(self, path: str | os.PathLike[str], anchor: LedgerAnchor | None = None) -> None:
        self.path = Path(path)
        self.anchor = anchor
        key = str(self.path.resolve())
        with PrivacyLedger._path_locks_guard:
            self._lock = PrivacyLedger._path_locks.setdefault(key, threading.RLock())
        self._document()  # refuse a corrupt or rolled-back file at once, not at the first round

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    # ------------------------------------------------------------------ reading
    def entries(self, scope: str = DEFAULT_SCOPE, *, run_id: str | None = None) -> list[LedgerEntry]:
        """Recorded entries of ``scope`` (only those of ``run_id`` when given), oldest first."""
        return [e for e in self._all_entries()
                if e.scope == scope and (run_id is None or e.run_id == run_id)]

    def all_entries(self) -> list[LedgerEntry]:
        """Every recorded entry, all scopes, oldest first."""
        return self._all_entries()

    def head(self) -> LedgerHead:
        """The chain's head: entry count and last hash."""
        return self._head(self._document())

    def delta(self, scope: str = DEFAULT_SCOPE) -> float | None:
        """The δ at which ``scope`` is accounted, or None before its first entry."""
        entries = self.entries(scope)
        return min(e.delta for e in entries) if entries else None

    def spent(
        self,
        scope: str = DEFAULT_SCOPE,
        delta: float | None = None,
        *,
        run_id: str | None = None,
        accountant: Accountant | None = None,
    ) -> float:
        """ε spent over all recorded training of ``scope`` (of one run with ``run_id``).

        Parameters
        ----------
        delta : float or None
            Must equal the scope's δ; ``None`` uses it. With no history, ε is 0.
        accountant : {"rdp", "prv"} or None
            Default: the recorded one, or ``"rdp"`` (the looser, conservative bound) if the
            history mixes accountants.
        """
        history = self.entries(scope)
        if not history:
            return 0.0
        delta = self._scope_delta(scope, history, delta)
        entries = [e for e in history if run_id is None or e.run_id == run_id]
        if not entries:
            return 0.0
        return compose_epsilon(
            [e.mechanism for e in entries],
            delta=delta,
            accountant=accountant or self._history_accountant(entries),
        )

    def projected(
        self,
        scope: str,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        run_id: str | None = None,
        accountant: Accountant | None = None,
    ) -> float:
        """ε ``scope`` (one run of it, with ``run_id``) would have spent after this training."""
        history = self.entries(scope)
        delta = self._scope_delta(scope, history, delta)
        entries = [e for e in history if run_id is None or e.run_id == run_id]
        if accountant is None:
            accountant = self._history_accountant(entries) if entries else "rdp"
        mechanisms = [e.mechanism for e in entries] + [(noise_multiplier, sample_rate, steps)]
        return compose_epsilon(mechanisms, delta=delta, accountant=accountant)

    def check_budget(
        self,
        scope: str,
        *,
        budget: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: Accountant | None = None,
    ) -> float:
        """The projected ε if it stays within ``budget``.

        Raises
        ------
        BudgetExceededError
            If the next training would take the scope's ε above ``budget``; the message names
            the remaining budget.
        """
        if not _is_number(budget) or budget <= 0:
            raise PrivacyConfigError(f"budget must be a finite ε > 0, got {budget!r}")
        spent = self.spent(scope, delta, accountant=accountant)
        projected = self.projected(
            scope, delta, noise_multiplier, sample_rate, steps, accountant=accountant
        )
        if projected > budget:
            raise BudgetExceededError(spent=spent, projected=projected, budget=budget, delta=delta)
        return projected

    def to_dict(self) -> dict[str, Any]:
        """The ledger as JSON-ready data, with each scope's current ε added (``summary``)."""
        doc = self._document()
        entries = [self._entry(item) for item in doc["entries"]]
        summary: dict[str, dict[str, Any]] = {}
        for scope in sorted({e.scope for e in entries}):
            mine = [e for e in entries if e.scope == scope]
            summary[scope] = {
                "epsilon": self.spent(scope),
                "delta": self._scope_delta(scope, mine, None),
                "steps": sum(e.steps for e in mine),
                "entries": len(mine),
                "runs_as": sorted({f"{e.consortium}/{e.model}" for e in mine}),
            }
        return {**doc, "head": asdict(self._head(doc)), "summary": summary}

    # ------------------------------------------------------------------ writing
    def record(
        self,
        scope: str,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: Accountant = "rdp",
        time: str | None = None,
        consortium: str = "",
        model: str = "",
    ) -> LedgerEntry:
        """Append one training, write the ledger durably, then anchor its new head.

        Raises
        ------
        LedgerError
            If ``delta`` differs from the δ already recorded for ``scope``, or the file cannot
            be read or written.
        LedgerIntegrityError
            If the ledger's chain is broken or lost an anchored head: nothing is written.
        PrivacyConfigError
            If a value is out of range.
        """
        entry = LedgerEntry(
            scope=_scope_name(scope),
            run_id=run_id,
            round=round,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=steps,
            delta=float(delta),
            accountant=accountant,
            time=time or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            consortium=consortium,
            model=model,
        )
        with contextlib.suppress(OSError):  # a failure shows up in _write, with the path
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            doc = self._load()
            existing = [self._entry(item) for item in doc["entries"] if item["scope"] == scope]
            if existing:
                self._scope_delta(scope, existing, entry.delta)
            prev = doc["entries"][-1]["hash"] if doc["entries"] else GENESIS
            item = {**entry.to_dict(), "prev": prev}
            item["hash"] = entry_hash(item)
            entries = [*doc["entries"], item]
            self._write({"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "entries": entries})
            if self.anchor is not None:  # under the lock: anchors follow the chain's order
                self.anchor.anchor(LedgerHead(len(entries), item["hash"]))
        return entry

    # ------------------------------------------------------------------ internals
    def _document(self) -> dict[str, Any]:
        with self._locked():
            return self._load()

    def _all_entries(self) -> list[LedgerEntry]:
        return [self._entry(item) for item in self._document()["entries"]]

    @staticmethod
    def _entry(item: dict[str, Any]) -> LedgerEntry:
        return LedgerEntry.from_dict({k: v for k, v in item.items() if k not in _CHAIN_FIELDS})

    @staticmethod
    def _head(doc: dict[str, Any]) -> LedgerHead:
        entries = doc["entries"]
        return LedgerHead(len(entries), entries[-1]["hash"] if entries else GENESIS)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if fcntl is None or not self.path.parent.is_dir():
                yield
                return
            lock_path = self.path.with_name(self.path.name + ".lock")
            with open(lock_path, "a+") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        doc = self._parse()
        self._check_chain(doc["entries"])
        if self.anchor is not None:
            self._check_anchors(doc["entries"], list(self.anchor.anchored()))
        return doc

    def _parse(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "entries": []}
        except OSError as exc:
            raise LedgerError(f"cannot read privacy ledger {self.path}: {exc}") from exc
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
                raise ValueError(f"not a {LEDGER_FORMAT} document")
            if doc.get("version") == 1:
                return self._migrate_v1(doc)
            if doc.get("version") != LEDGER_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            entries = doc.get("entries")
            if not isinstance(entries, list):
                raise ValueError("'entries' must be a list")
            for item in entries:
                if not isinstance(item, dict) or not all(
                    isinstance(item.get(k), str) for k in _CHAIN_FIELDS
                ):
                    raise ValueError("each entry must carry its 'prev' and 'hash'")
                self._entry(item)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and PrivacyConfigError too
            raise LedgerError(
                f"privacy ledger {self.path} is corrupt and was not used (it is never reset "
                f"automatically; restore it from a backup): {exc}"
            ) from exc
        return cast(dict[str, Any], doc)

    @staticmethod
    def _migrate_v1(doc: dict[str, Any]) -> dict[str, Any]:
        """Version 1 (keyed by consortium and model) as version 2: all of it in the site scope."""
        ledgers = doc.get("ledgers")
        if not isinstance(ledgers, dict):
            raise ValueError("'ledgers' must be an object")
        entries: list[LedgerEntry] = []
        for consortium, models in sorted(ledgers.items()):
            if not isinstance(models, dict):
                raise ValueError("each consortium must map model names to entry lists")
            for model, raw in sorted(models.items()):
                if not isinstance(raw, list):
                    raise ValueError("each model must map to a list of entries")
                for item in raw:
                    if not isinstance(item, dict):
                        raise ValueError(f"entry must be an object, got {item!r}")
                    entries.append(LedgerEntry.from_dict(
                        {**item, "scope": DEFAULT_SCOPE, "consortium": consortium, "model": model}))
        entries.sort(key=lambda e: e.time)  # stable: ties keep the sorted key order
        return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "entries": _chained(entries),
                "migrated_from": 1}

    @staticmethod
    def _check_chain(stored: list[dict[str, Any]]) -> None:
        prev = GENESIS
        for number, item in enumerate(stored, start=1):
            if item["hash"] != entry_hash(item):
                raise LedgerIntegrityError(
                    f"privacy ledger entry {number} of {len(stored)} does not match its hash "
                    "(the entry was edited); the ledger was not used and is never reset "
                    "automatically: restore it from a backup"
                )
            if item["prev"] != prev:
                raise LedgerIntegrityError(
                    f"privacy ledger entry {number} of {len(stored)} does not follow the entry "
                    "before it (an entry was removed, inserted or moved); the ledger was not "
                    "used and is never reset automatically: restore it from a backup"
                )
            prev = item["hash"]

    def _check_anchors(self, stored: list[dict[str, Any]], anchors: list[LedgerHead]) -> None:
        hashes = [item["hash"] for item in stored]
        for anchor in sorted(anchors, key=lambda h: h.entries, reverse=True):  # the longest first
            if anchor.entries > len(hashes):
                what = (f"is missing but the audit log anchored {anchor.entries} entries"
                        if not self.path.exists() and not hashes else
                        f"holds {len(hashes)} entries, fewer than the {anchor.entries} the audit "
                        "log anchored")
                raise LedgerIntegrityError(
                    f"privacy ledger {what} "
                    "(the ledger was deleted, truncated or rolled back); no DP round runs until "
                    "the ledger is restored from a backup (`fedseg site ledger verify`)"
                )
            if anchor.entries and hashes[anchor.entries - 1] != anchor.hash:
                raise LedgerIntegrityError(
                    f"privacy ledger entry {anchor.entries} is not the one the audit log anchored "
                    "(the ledger was rewritten or replaced); no DP round runs until the ledger "
                    "is restored from a backup (`fedseg site ledger verify`)"
                )

    def _write(self, doc: dict[str, Any]) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(doc, handle, indent=2, sort_keys=True)
                    handle.write("\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if hasattr(os, "O_DIRECTORY"):
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise LedgerError(f"cannot write privacy ledger {self.path}: {exc}") from exc

    @staticmethod
    def _scope_delta(scope: str, entries: list[LedgerEntry], delta: float | None) -> float:
        if not entries:
            if delta is None:
                raise PrivacyConfigError("no history yet: give the δ to account at")
            return float(delta)
        recorded = min(e.delta for e in entries)
        if delta is not None and not math.isclose(delta, recorded, rel_tol=1e-12, abs_tol=0.0):
            raise LedgerError(
                f"budget scope {scope!r} is accounted at δ={recorded:g}, not δ={delta:g}: a "
                f"site's budget is one (ε, δ) pair; keep δ={recorded:g} for this scope"
            )
        return recorded

    @staticmethod
    def _history_accountant(entries: list[LedgerEntry]) -> Accountant:
        kinds = {e.accountant for e in entries}
        return kinds.pop() if len(kinds) == 1 else "rdp"

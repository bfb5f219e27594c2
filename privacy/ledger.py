"""The durable per-site privacy ledger.

One JSON file per site records every DP-SGD training the site ran, keyed by
``(consortium, model_name)``. ε is never stored: it is recomposed from all recorded
``(noise_multiplier, sample_rate, steps)`` with one fresh Opacus accountant, which is what the
site has spent in total (a PrivacyEngine per round only knows its own round).

δ policy: a ``(consortium, model)`` history has exactly one δ. :meth:`PrivacyLedger.record`
refuses an entry whose δ differs from the recorded one, and the read methods refuse a δ other
than the recorded one (:class:`~privacy.errors.LedgerError`): the site's budget is one
``(ε, δ)`` pair. Pick δ once per site and model (e.g. from the site's size at its first round).

File format::

    {"format": "fedseg-privacy-ledger", "version": 1,
     "ledgers": {"<consortium>": {"<model>": [<entry>, ...]}}}

Writes go to a temporary file in the same folder, are fsync'ed, then ``os.replace``'d over the
ledger (and the folder fsync'ed): a crash leaves the old or the new file, never a torn one. A
lock (a per-path thread lock plus ``fcntl.flock`` on ``<path>.lock`` where available) makes
read-modify-write safe between threads and processes. Every call re-reads the file, so a
restarted process sees what was recorded before. A file that cannot be parsed is refused with
the path in the message: the ledger never silently resets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from .accounting import compose_epsilon
from .config import Accountant
from .errors import BudgetExceededError, LedgerError, PrivacyConfigError

try:  # POSIX: also serialise writers in other processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LedgerEntry", "PrivacyLedger", "LEDGER_FORMAT", "LEDGER_VERSION"]

LEDGER_FORMAT = "fedseg-privacy-ledger"
LEDGER_VERSION = 1
_ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD training run of a site (one round, or one retry of it).

    Every training must be recorded, retries included: each one spends privacy.
    """

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: Accountant
    time: str

    def __post_init__(self) -> None:
        problems = []
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
        if not isinstance(self.time, str):
            problems.append(f"time must be an ISO 8601 string, got {self.time!r}")
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


class PrivacyLedger:
    """A site's durable record of DP-SGD training, and its budget checks.

    Parameters
    ----------
    path : str or os.PathLike
        The site's ledger file (one per site); created on the first :meth:`record`.
    """

    _path_locks: dict[str, threading.RLock] = {}
    _path_locks_guard = threading.Lock()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        key = str(self.path.resolve())
        with PrivacyLedger._path_locks_guard:
            self._lock = PrivacyLedger._path_locks.setdefault(key, threading.RLock())
        self._load()  # refuse a corrupt file at once, not at the first round

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    # ------------------------------------------------------------------ reading
    def entries(self, consortium: str, model: str) -> list[LedgerEntry]:
        """Recorded entries for ``(consortium, model)``, oldest first."""
        with self._locked():
            doc = self._load()
        raw = doc["ledgers"].get(consortium, {}).get(model, [])
        return [LedgerEntry.from_dict(e) for e in raw]

    def spent(
        self,
        consortium: str,
        model: str,
        delta: float | None = None,
        *,
        accountant: Accountant | None = None,
    ) -> float:
        """ε spent over all recorded training of ``(consortium, model)``.

        Parameters
        ----------
        delta : float or None
            Must equal the recorded δ; ``None`` uses it. With no history, ε is 0.
        accountant : {"rdp", "prv"} or None
            Default: the recorded one, or ``"rdp"`` (the looser, conservative bound) if the
            history mixes accountants.
        """
        entries = self.entries(consortium, model)
        if not entries:
            return 0.0
        delta = self._history_delta(consortium, model, entries, delta)
        return compose_epsilon(
            [e.mechanism for e in entries],
            delta=delta,
            accountant=accountant or self._history_accountant(entries),
        )

    def projected(
        self,
        consortium: str,
        model: str,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        accountant: Accountant | None = None,
    ) -> float:
        """ε the site would have spent if the next training ran with these settings."""
        entries = self.entries(consortium, model)
        delta = self._history_delta(consortium, model, entries, delta)
        if accountant is None:
            accountant = self._history_accountant(entries) if entries else "rdp"
        history = [e.mechanism for e in entries] + [(noise_multiplier, sample_rate, steps)]
        return compose_epsilon(history, delta=delta, accountant=accountant)

    def check_budget(
        self,
        consortium: str,
        model: str,
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
            If the next training would take the site's ε above ``budget``; the message names
            the remaining budget.
        """
        if not _is_number(budget) or budget <= 0:
            raise PrivacyConfigError(f"budget must be a finite ε > 0, got {budget!r}")
        spent = self.spent(consortium, model, delta, accountant=accountant)
        projected = self.projected(
            consortium, model, delta, noise_multiplier, sample_rate, steps, accountant=accountant
        )
        if projected > budget:
            raise BudgetExceededError(spent=spent, projected=projected, budget=budget, delta=delta)
        return projected

    def to_dict(self) -> dict[str, Any]:
        """The ledger as JSON-ready data, with each history's current ε added (``summary``)."""
        with self._locked():
            doc = self._load()
        summary: dict[str, dict[str, dict[str, Any]]] = {}
        for consortium, models in doc["ledgers"].items():
            for model, raw in models.items():
                entries = [LedgerEntry.from_dict(e) for e in raw]
                if not entries:
                    continue
                delta = self._history_delta(consortium, model, entries, None)
                summary.setdefault(consortium, {})[model] = {
                    "epsilon": self.spent(consortium, model, delta),
                    "delta": delta,
                    "steps": sum(e.steps for e in entries),
                    "entries": len(entries),
                }
        return {**doc, "summary": summary}

    # ------------------------------------------------------------------ writing
    def record(
        self,
        consortium: str,
        model: str,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: Accountant = "rdp",
        time: str | None = None,
    ) -> LedgerEntry:
        """Append one training run and write the ledger durably.

        Raises
        ------
        LedgerError
            If ``delta`` differs from the δ already recorded for ``(consortium, model)``, or
            the file cannot be read or written.
        PrivacyConfigError
            If a value is out of range.
        """
        for name, value in (("consortium", consortium), ("model", model)):
            if not isinstance(value, str) or not value:
                raise PrivacyConfigError(f"{name} must be a non-empty string, got {value!r}")
        entry = LedgerEntry(
            run_id=run_id,
            round=round,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=steps,
            delta=float(delta),
            accountant=accountant,
            time=time or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        with contextlib.suppress(OSError):  # a failure shows up in _write, with the path
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            doc = self._load()
            history = doc["ledgers"].setdefault(consortium, {}).setdefault(model, [])
            existing = [LedgerEntry.from_dict(e) for e in history]
            self._history_delta(consortium, model, existing, entry.delta)
            history.append(entry.to_dict())
            self._write(doc)
        return entry

    # ------------------------------------------------------------------ internals
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
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "ledgers": {}}
        except OSError as exc:
            raise LedgerError(f"cannot read privacy ledger {self.path}: {exc}") from exc
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
                raise ValueError(f"not a {LEDGER_FORMAT} document")
            if doc.get("version") != LEDGER_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            ledgers = doc.get("ledgers")
            if not isinstance(ledgers, dict):
                raise ValueError("'ledgers' must be an object")
            for models in ledgers.values():
                if not isinstance(models, dict):
                    raise ValueError("each consortium must map model names to entry lists")
                for raw in models.values():
                    if not isinstance(raw, list):
                        raise ValueError("each model must map to a list of entries")
                    for item in raw:
                        LedgerEntry.from_dict(item)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and PrivacyConfigError too
            raise LedgerError(
                f"privacy ledger {self.path} is corrupt and was not used (it is never reset "
                f"automatically; restore it from a backup): {exc}"
            ) from exc
        return cast(dict[str, Any], doc)

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

    def _history_delta(
        self, consortium: str, model: str, entries: list[LedgerEntry], delta: float | None
    ) -> float:
        deltas = {e.delta for e in entries}
        if len(deltas) > 1:
            raise LedgerError(
                f"privacy ledger {self.path} mixes deltas {sorted(deltas)} for "
                f"{consortium}/{model}; one history needs one δ"
            )
        if not deltas:
            if delta is None:
                raise PrivacyConfigError("no history yet: give the δ to account at")
            return float(delta)
        recorded = deltas.pop()
        if delta is not None and not math.isclose(delta, recorded, rel_tol=1e-12, abs_tol=0.0):
            raise LedgerError(
                f"{consortium}/{model} was recorded at δ={recorded:g}, not δ={delta:g}: a site's "
                f"budget is one (ε, δ) pair; keep δ={recorded:g} for this model"
            )
        return recorded

    @staticmethod
    def _history_accountant(entries: list[LedgerEntry]) -> Accountant:
        kinds = {e.accountant for e in entries}
        return kinds.pop() if len(kinds) == 1 else "rdp"

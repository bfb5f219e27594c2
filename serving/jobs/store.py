"""A durable job queue: one sqlite table (WAL) plus each job's uploaded files on disk.

A job's files are written under ``<root>/jobs/<id>/`` before its row is inserted, so a job that
the client was told about always has its inputs. Workers *claim* a job with a lease
(``BEGIN IMMEDIATE`` serialises claims across threads and processes); a job whose worker died is
claimed again once the lease has expired. Finishing is one ``UPDATE`` that records the result and
succeeds only while the worker still owns the lease, and ``done``/``failed`` jobs are never
claimed again, so a job's result is written exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..uploads import UploadedFile
from .errors import BadIdempotencyKeyError, IdempotencyConflictError, JobNotFoundError

__all__ = ["Job", "JobStatus", "JobStore", "body_hash", "check_idempotency_key"]

JobStatus = Literal["queued", "running", "done", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    body_hash       TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    options         TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_expires   REAL,
    result          TEXT,
    error           TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (status, created_at);
"""
_MANIFEST = "manifest.json"
_MAX_KEY = 255


@dataclass(frozen=True)
class Job:
    """One job as stored.

    Attributes
    ----------
    id : str
        Random hex id.
    status : {"queued", "running", "done", "failed"}
    attempts : int
        How many times a worker claimed it.
    options : dict
        The submitted options (e.g. ``{"store": true}``).
    result, error : dict or None, str or None
        Set when ``done`` or ``failed``.
    created_at, updated_at : float
        Unix times.
    idempotency_key : str or None
    """

    id: str
    status: JobStatus
    attempts: int
    options: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    updated_at: float
    idempotency_key: str | None
    body_hash: str

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            status=row["status"],
            attempts=int(row["attempts"]),
            options=json.loads(row["options"]),
            result=json.loads(row["result"]) if row["result"] is not None else None,
            error=row["error"],
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
            idempotency_key=row["idempotency_key"],
            body_hash=row["body_hash"],
        )


def check_idempotency_key(key: str) -> str:
    """The key if it is 1 to 255 printable ASCII characters, else :class:`BadIdempotencyKeyError`."""
    if not key or len(key) > _MAX_KEY or not all(" " <= c <= "~" for c in key):
        raise BadIdempotencyKeyError(
            f"Idempotency-Key must be 1 to {_MAX_KEY} printable ASCII characters, got {key[:40]!r}"
            + ("..." if len(key) > 40 else "")
        )
    return key


def body_hash(files: Sequence[UploadedFile], options: Mapping[str, Any]) -> str:
    """What makes two submissions "the same": the files' contents (in any order) and the options."""
    digest = hashlib.sha256(json.dumps(dict(options), sort_keys=True).encode())
    for file_hash in sorted(hashlib.sha256(f.data).hexdigest() for f in files):
        digest.update(file_hash.encode())
    return digest.hexdigest()


class JobStore:
    """The queue under ``root`` (``jobs.db`` and ``jobs/<id>/``).

    Parameters
    ----------
    root : Path
        Typically ``$FEDSEG_HOME/serving``.
    lease_s : float
        How long a claim lasts unless renewed.
    max_attempts : int
        Claims before a job whose workers keep dying is marked ``failed``.

    Notes
    -----
    Every method opens its own connection, so one store can be shared by threads; several
    processes may share the files too (sqlite locking, WAL journal).
    """

    def __init__(self, root: Path, *, lease_s: float = 600.0, max_attempts: int = 3) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.root = Path(root)
        self.files_dir = self.root / "jobs"
        self.db_path = self.root / "jobs.db"
        self.lease_s = float(lease_s)
        self.max_attempts = int(max_attempts)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction: claims never interleave."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, column: str, value: str) -> Job | None:
        row = db.execute(f"SELECT * FROM jobs WHERE {column} = ?", (value,)).fetchone()
        return Job._from_row(row) if row is not None else None

    # ------------------------------------------------------------------ clients' side

    def submit(
        self, files: Sequence[UploadedFile], options: Mapping[str, Any], key: str | None = None
    ) -> tuple[Job, bool]:
        """Queue a job, or find the one already submitted with ``key``.

        Returns
        -------
        (Job, bool)
            The job, and whether it was created now (False: an idempotent replay).

        Raises
        ------
        IdempotencyConflictError
            ``key`` was used before with other files or options.
        BadIdempotencyKeyError
        """
        if key is not None:
            check_idempotency_key(key)
        digest = body_hash(files, options)
        if key is not None:
            with self._connect() as db:
                existing = self._row(db, "idempotency_key", key)
            if existing is not None:
                return self._replay(existing, key, digest), False
        job_id = uuid.uuid4().hex
        self._write_files(job_id, files)
        now = time.time()
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO jobs (id, idempotency_key, body_hash, status, options, created_at, "
                    "updated_at) VALUES (?, ?, ?, 'queued', ?, ?, ?)",
                    (job_id, key, digest, json.dumps(dict(options), sort_keys=True), now, now),
                )
                job = self._row(db, "id", job_id)
        except sqlite3.IntegrityError:  # a concurrent request with the same key won
            shutil.rmtree(self.files_dir / job_id, ignore_errors=True)
            with self._connect() as db:
                existing = self._row(db, "idempotency_key", key or "")
            if existing is None:  # pragma: no cover - the unique key is the only constraint
                raise
            return self._replay(existing, key or "", digest), False
        assert job is not None
        return job, True

    @staticmethod
    def _replay(existing: Job, key: str, digest: str) -> Job:
        if existing.body_hash != digest:
            raise IdempotencyConflictError(
                f"Idempotency-Key {key!r} was already used for job {existing.id} with other files "
                "or options; use a new key for a new request"
            )
        return existing

    def _write_files(self, job_id: str, files: Sequence[UploadedFile]) -> None:
        """Write the inputs to a temporary folder, flush them, then rename it into place."""
        final = self.files_dir / job_id
        partial = self.files_dir / f".partial-{job_id}"
        partial.mkdir(parents=True)
        names = []
        for index, upload in enumerate(files):
            path = partial / f"{index:05d}.dcm"
            with path.open("wb") as out:
                out.write(upload.data)
                out.flush()
                os.fsync(out.fileno())
            names.append(upload.name)
        (partial / _MANIFEST).write_text(json.dumps(names))
        os.replace(partial, final)

    def get(self, job_id: str) -> Job:
        """The job, or :class:`JobNotFoundError`."""
        with self._connect() as db:
            job = self._row(db, "id", job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return job

    def inputs(self, job_id: str) -> list[UploadedFile]:
        """The files submitted with a job, with their uploaded names."""
        folder = self.files_dir / job_id
        if not folder.is_dir():
            raise JobNotFoundError(f"the files of job {job_id!r} are gone")
        names = json.loads((folder / _MANIFEST).read_text())
        return [
            UploadedFile(name, (folder / f"{index:05d}.dcm").read_bytes())
            for index, name in enumerate(names)
        ]

    def depth(self) -> int:
        """Jobs queued or running."""
        with self._connect() as db:
            row = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ workers' side

    def claim(self, owner: str) -> Job | None:
        """Take the oldest queued job, or a running one whose lease has expired.

        A job already claimed ``max_attempts`` times is marked ``failed`` instead (its workers
        keep dying). Returns None when there is nothing to do.
        """
        while True:
            now = time.time()
            with self._transaction() as db:
                row = db.execute(
                    "SELECT * FROM jobs WHERE status = 'queued' OR (status = 'running' AND "
                    "lease_expires <= ?) ORDER BY created_at, rowid LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                if int(row["attempts"]) >= self.max_attempts:
                    db.execute(
                        "UPDATE jobs SET status = 'failed', error = ?, lease_owner = NULL, "
                        "lease_expires = NULL, updated_at = ? WHERE id = ?",
                        (f"gave up after {row['attempts']} attempts: the worker running it "
                         "stopped before finishing each time", now, row["id"]),
                    )
                    continue
                db.execute(
                    "UPDATE jobs SET status = 'running', lease_owner = ?, lease_expires = ?, "
                    "attempts = attempts + 1, updated_at = ? WHERE id = ?",
                    (owner, now + self.lease_s, now, row["id"]),
                )
                return self._row(db, "id", row["id"])

    def renew(self, job_id: str, owner: str) -> bool:
        """Extend ``owner``'s lease; False when it no longer holds the job."""
        now = time.time()
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_expires = ?, updated_at = ? WHERE id = ? AND "
                "status = 'running' AND lease_owner = ?",
                (now + self.lease_s, now, job_id, owner),
            )
        return cursor.rowcount == 1

    def complete(self, job_id: str, owner: str, result: Mapping[str, Any]) -> bool:
        """Record the result and mark the job ``done``, atomically, if ``owner`` still holds it.

        Returns False (and records nothing) when the lease was lost to another worker.
        """
        return self._finish(job_id, owner, "done", json.dumps(dict(result)), None)

    def fail(self, job_id: str, owner: str, error: str) -> bool:
        """Mark the job ``failed`` with ``error`` if ``owner`` still holds it."""
        return self._finish(job_id, owner, "failed", None, error)

    def _finish(self, job_id: str, owner: str, status: str, result: str | None, error: str | None) -> bool:
        now = time.time()
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, lease_owner = NULL, "
                "lease_expires = NULL, updated_at = ? WHERE id = ? AND status = 'running' AND "
                "lease_owner = ?",
                (status, result, error, now, job_id, owner),
            )
        if cursor.rowcount != 1:
            return False
        shutil.rmtree(self.files_dir / job_id, ignore_errors=True)  # no PHI kept once answered
        return True

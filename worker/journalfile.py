"""A run's journal file, ``<state-dir>/<run-id>/journal.sqlite``: made or opened, and read.

``JournalFile`` makes the file (the run folder 0700 and the journal 0600 before SQLite opens
it; its ``-wal`` and ``-shm`` files take the journal's mode) or opens an existing one without
writing to it, and reads it: the run row, the targets by status and reason, the results in
plan order, an undone run's updated targets. ``worker.journal.Journal`` adds the one writer.
A finished run's journal is compacted to its run row; its targets are then read from its
results.jsonl.gz (``worker/record.py``). ``read_run_info`` reads a run row without opening
the journal for writing (``runs``, ``--resume``'s search, a plan to apply).

Tables: ``run`` (one row: the job, its hash, options, times, exit code, summary),
``targets`` (every planned target: where, what the plan said, the state before, the patch,
the changes for re-planning) and ``outcomes`` (how each target ended). A target without an
outcome is pending; ``iter_results`` reports it as ``planned``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from worker import record, safety
from worker.models import RESULT_FIELDS
from worker.statevol import volume_error

SCHEMA_VERSION = 1

#: the run row as ``run_info`` and ``read_run_info`` return it
_RUN_KEYS = ("run_id", "kind", "job_name", "job_path", "job_hash", "options", "parent_run_id",
             "shard", "started_at", "plan_done", "finished_at", "exit_code", "summary")
_SELECT_RUN = f"SELECT {', '.join(_RUN_KEYS)} FROM run"

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL, kind TEXT NOT NULL, job_name TEXT NOT NULL, job_path TEXT,
    job_hash TEXT, options TEXT, parent_run_id TEXT, shard TEXT,
    started_at TEXT NOT NULL, plan_done INTEGER NOT NULL DEFAULT 0,
    finished_at TEXT, exit_code INTEGER, summary TEXT
);
CREATE TABLE IF NOT EXISTS targets (
    seq INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL, region_id INTEGER NOT NULL, image_id TEXT NOT NULL,
    name TEXT, source TEXT, changes TEXT, before TEXT, patch TEXT, lock_task TEXT,
    plan_status TEXT NOT NULL, plan_reason TEXT, plan_detail TEXT, expect TEXT,
    UNIQUE (project_id, region_id, image_id)
);
CREATE TABLE IF NOT EXISTS outcomes (
    seq INTEGER PRIMARY KEY REFERENCES targets (seq),
    status TEXT NOT NULL, reason TEXT, after TEXT, patch TEXT, attempts INTEGER,
    http_status INTEGER, lock_wait_s REAL, duration_ms INTEGER, error TEXT,
    finished_at REAL NOT NULL, before TEXT
);
"""


def load_json(text: str | None) -> Any:
    """A JSON column's value (None for NULL)."""
    return None if text is None else orjson.loads(text)


def open_read_only(path: Path) -> sqlite3.Connection | None:
    """A journal file opened read-only (``read_run_info``, the timeline's readers), or None
    where SQLite cannot open it."""
    try:
        # as_uri() quotes what a URI would misread (?, #, %, spaces) in the path
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class JournalFile:
    """A run's journal, made or opened (nothing is written to an existing one), and read.

    The connection may be shared by two threads (the writer's commits run in a worker
    thread): every use of it holds ``_db``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "journal.sqlite"
        self._db = threading.Lock()  # every use of self._conn holds it (two threads use it)
        try:
            # a real folder of ours, 0700; no file in it a symlink or another user's
            safety.private_run_dir(run_dir)
            safety.create_private_file(self.path)
            self._conn = _connect(self.path)
            with self._db:
                # an existing journal (resume, report, undo's parent, maybe a live run) is
                # not written to just by opening it
                (version,) = self._conn.execute("PRAGMA user_version").fetchone()
                if not version:
                    self._conn.executescript(SCHEMA)
                    self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                #: a finished run's journal holds its run row only; record.py reads its targets
                self.compacted = self._conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'targets'"
                ).fetchone() is None
        except (OSError, sqlite3.Error) as exc:  # a full or unwritable volume, said plainly
            plain = volume_error(exc, run_dir.parent)
            if plain is None:
                raise
            raise plain from None

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._db:
            return self._conn.execute(sql, params).fetchall()

    def run_info(self) -> dict[str, Any]:
        rows = self._execute(_SELECT_RUN)
        return _run_row(rows[0], strict=True) if rows else {}

    # -- reads --------------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        return _connect(self.path)

    def counts(self) -> dict[str, int]:
        """Targets by final status; pending ones as ``planned``."""
        if self.compacted:
            counts = (self.run_info().get("summary") or {}).get("counts") or {}
            return {status: int(n) for status, n in counts.items() if n}
        rows = self._execute(
            "SELECT COALESCE(o.status, 'planned'), COUNT(*) FROM targets t"
            " LEFT JOIN outcomes o ON o.seq = t.seq GROUP BY 1"
        )
        return {status: n for status, n in rows}

    def reasons(self) -> dict[str, dict[str, int]]:
        """Skipped and failed targets by reason (summary.json's ``reasons``; compacted: its)."""
        if self.compacted:
            return dict((self.run_info().get("summary") or {}).get("reasons") or {})
        out: dict[str, dict[str, int]] = {}
        for status, reason, n in self._execute(
                "SELECT status, COALESCE(reason, '(none)'), COUNT(*) FROM outcomes WHERE status"
                " IN ('skipped', 'failed') GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"):
            out.setdefault(status, {})[reason] = n
        return out

    def plan_counts(self) -> tuple[int, int]:
        """(targets planned to change, targets in all)."""
        (row,) = self._execute("SELECT SUM(plan_status = 'planned'), COUNT(*) FROM targets")
        return int(row[0] or 0), int(row[1] or 0)

    def _chunks(self, sql: str, chunk: int) -> Iterator[list[Any]]:
        """``sql`` (ending ``t.seq > ? ORDER BY t.seq LIMIT ?``, seq first) in chunks, through a
        reader connection of its own."""
        conn = self._reader()
        try:
            last = 0
            while rows := conn.execute(sql, (last, chunk)).fetchall():
                yield rows
                last = rows[-1][0]
        finally:
            conn.close()

    def iter_results(
        self, run_id: str, chunk: int = 2000, *, raw: bool = False
    ) -> Iterator[Any]:
        """One result per target, in plan order, as a dict (a results.jsonl line: README, "Read
        a run's report from the volume").

        ``raw``: a tuple in ``models.RESULT_FIELDS`` order instead, with ``before``/``after``/
        ``patch`` as the JSON text the journal holds (the exports embed it as it is instead
        of decoding and encoding it again)."""
        if self.compacted:
            yield from record.iter_results(self.run_dir, raw=raw)
            return
        load = (lambda text: text) if raw else load_json
        for rows in self._chunks(
            "SELECT t.seq, t.project_id, t.region_id, t.image_id, t.name, t.plan_status,"
            " t.plan_reason, t.plan_detail, t.before, t.patch, o.status, o.reason, o.after,"
            " o.patch, o.attempts, o.http_status, o.lock_wait_s, o.duration_ms, o.error,"
            " o.before FROM targets t LEFT JOIN outcomes o ON o.seq = t.seq"
            " WHERE t.seq > ? ORDER BY t.seq LIMIT ?", chunk):
            for (_seq, p, r, image_id, name, plan_status, plan_reason, plan_detail, before,
                 patch, status, reason, after, opatch, attempts, http_status, lock_wait,
                 duration, error, obefore) in rows:
                result = (
                    run_id, p, r, image_id, name,
                    status or "planned",
                    reason if status else (plan_reason or None),
                    load(obefore if obefore is not None else before),
                    load(after),
                    # an ended target shows what was sent (none for a no-op), a pending
                    # one what the plan would send
                    load(opatch if status else patch),
                    attempts or 0, http_status, lock_wait or 0.0, duration or 0,
                    error if status else (plan_detail if plan_status != "planned" else None),
                )
                yield result if raw else dict(zip(RESULT_FIELDS, result, strict=True))

    def iter_updated(self, chunk: int = 2000) -> Iterator[tuple[int, int, str, str, dict[str, Any],
                                                               dict[str, Any]]]:
        """For undo: (project, region, image, name, before, patch) of each updated target:
        the state it was read in and the patch sent (after a lock or a resume, the last read)."""
        if self.compacted:
            yield from record.iter_updated(self.run_dir)
            return
        for rows in self._chunks(
            "SELECT t.seq, t.project_id, t.region_id, t.image_id, t.name,"
            " COALESCE(o.before, t.before), COALESCE(o.patch, t.patch)"
            " FROM targets t JOIN outcomes o ON o.seq = t.seq"
            " WHERE o.status = 'updated' AND t.seq > ? ORDER BY t.seq LIMIT ?", chunk):
            for _seq, p, r, image_id, name, before, patch in rows:
                yield p, r, image_id, name or "", load_json(before) or {}, load_json(patch) or {}


# -- finding runs ------------------------------------------------------------------------------
def read_run_info(run_dir: Path) -> dict[str, Any]:
    """The run row of ``run_dir``'s journal (read-only), or {} where there is none."""
    path = run_dir / "journal.sqlite"
    if not safety.ours(run_dir, directory=True) or not safety.ours(path, directory=False):
        return {}  # another user's, a symlink, or none
    conn = open_read_only(path)
    if conn is None:
        return {}
    try:
        row = conn.execute(_SELECT_RUN).fetchone()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return {} if row is None else _run_row(row, strict=False)


def _run_row(row: tuple[Any, ...], *, strict: bool) -> dict[str, Any]:
    """A run row as a dict, its JSON columns decoded; ``strict=False`` (another run's
    folder, read-only): one that does not decode reads as None instead of raising."""
    info = dict(zip(_RUN_KEYS, row, strict=True))
    for key in ("options", "summary"):
        try:
            info[key] = load_json(info[key])
        except orjson.JSONDecodeError:
            if strict:
                raise
            info[key] = None
    return info

"""The durable record of a run, written: ``<state-dir>/<run-id>/journal.sqlite`` (the file, its
tables and its reads: ``worker.journalfile``).

One writer owns the file (SQLite in WAL mode); everything else reads through its own
connection. Writes are buffered and committed in batches of at most ``batch`` rows or
``flush_s`` seconds, in a worker thread so the event loop never waits on the disk. A killed
process loses at most the last uncommitted batch; ``--resume`` reads those targets again (a
PATCH that landed is recorded ``updated`` by the pool, one that did not is sent: merge patches
are idempotent). No target with a committed outcome is sent again. Once the run has finished
and its results.jsonl.gz is written, ``compact`` drops ``targets`` and ``outcomes``.

The connection is shared by the event loop's thread and the commit thread, so every use of it
holds one lock: a commit is never split by a run-row update, and a commit left running by a
cancelled ``flush`` is waited for.

The hot path, ``add_outcome``, buffers a tuple: the ``before`` and ``patch`` the pool got from
``iter_pending`` are written back from their stored JSON text, not encoded again. A commit that
fails (disk full) is not retried: the next ``add_outcome`` or ``flush`` raises (a full or
unwritable volume: ``statevol.StateVolumeError``, exit 74; anything else ``JournalFailed``, exit
75), so the run stops instead of sending PATCHes it can no longer record; ``--resume`` goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from worker import processes, record, timeline
from worker.errors import BulkTaggerError, ExitCode
from worker.journalfile import JournalFile, load_json, read_run_info
from worker.log import scrub
from worker.models import Changes, Image, Outcome, changes_from_json, changes_to_json
from worker.statevol import volume_error

__all__ = ["Journal", "JournalFailed", "Pending", "now_iso", "read_run_info"]

_PENDING = (
    "SELECT t.seq, t.project_id, t.region_id, t.image_id, t.name, t.changes, t.before, t.patch,"
    " t.lock_task, t.expect FROM targets t LEFT JOIN outcomes o ON o.seq = t.seq"
    " WHERE o.seq IS NULL AND t.plan_status IN ('planned', 'pending')"
)


def _dumps(value: Any) -> str:
    # orjson: compact UTF-8 JSON, several times cheaper than json on this hot path
    return orjson.dumps(value).decode()


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def now_iso(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as UTC ISO 8601 text to the millisecond, ``Z``-suffixed."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JournalFailed(BulkTaggerError):
    """The journal could not commit (disk full, file gone): the run stops, resume goes on."""

    exit_code = ExitCode.INTERRUPTED


# not frozen (made once a target, never changed): a frozen dataclass's __init__ costs
# about three times as much, and this is on every target's path
@dataclass(slots=True)
class Pending:
    """A planned target not yet ended: what the apply phase sends.

    ``before`` is None as ``iter_pending`` hands it out: the plan-time state stays in the
    journal (not decoded for every target), and an outcome that passes ``before`` on as it
    came (None) is recorded with that stored state. The pool sets it when it reads again.
    """

    seq: int
    project_id: int
    region_id: int
    image_id: str
    name: str
    changes: Changes
    before: dict[str, Any] | None
    patch: dict[str, Any] | None
    lock_task: str | None
    expect: dict[str, Any] | None = None  # undo: the state the image must still show
    #: a resumed run: the image as read again just now (``read``; None: no such image)
    image: Image | None = None
    read: bool = False


class Journal(JournalFile):
    """A run's journal: constructing it creates the file or reopens it (writing nothing to an
    existing one); ``start_writer`` begins batched commits, ``stop_writer`` and ``close`` end
    them (both commit what is buffered)."""

    def __init__(self, run_dir: Path, *, batch: int = 500, flush_s: float = 1.0) -> None:
        super().__init__(run_dir)
        self.batch = batch
        self.flush_s = flush_s
        self._targets: list[tuple[Any, ...]] = []
        self._outcomes: list[tuple[Any, ...]] = []
        # what iter_pending handed out and has no outcome yet: seq -> (before, its JSON text,
        # patch, its JSON text), so add_outcome need not encode them again
        self._handed: dict[int, tuple[Any, str | None, Any, str | None]] = {}
        self._last_changes: tuple[Changes | None, str] = (None, "")
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._failed: BaseException | None = None
        self._closed = False
        self._process: tuple[int, processes.Counters] | None = None
        self._counted: tuple[Any, ...] | None = None  # the counters last committed
        self._timeline: timeline.Timeline | None = None  # the report's seconds (timeline.py)

    # -- the run row ------------------------------------------------------------------------
    def create_run(
        self,
        *,
        run_id: str,
        kind: str,
        job_name: str,
        job_path: str | None,
        job_hash: str | None,
        options: Mapping[str, Any],
        parent_run_id: str | None = None,
        shard: str | None = None,
        started_at: str | None = None,
    ) -> None:
        self._execute(
            "INSERT INTO run (id, run_id, kind, job_name, job_path, job_hash, options,"
            " parent_run_id, shard, started_at) VALUES (1,?,?,?,?,?,?,?,?,?)",
            (run_id, kind, job_name, job_path, job_hash, _json(dict(options)),
             parent_run_id, shard, started_at or now_iso()),
        )

    def mark_plan_done(self) -> None:
        """The whole plan is committed (call after ``flush``): resume skips planning."""
        self._execute("UPDATE run SET plan_done = 1")

    def reopen_run(self) -> None:
        self._execute("UPDATE run SET finished_at = NULL, exit_code = NULL")

    def finish_run(
        self, exit_code: int, summary: Mapping[str, Any], finished_at: str | None = None
    ) -> None:
        self._execute(
            "UPDATE run SET finished_at = ?, exit_code = ?, summary = ?",
            (finished_at or now_iso(), exit_code, scrub(_dumps(dict(summary)))),
        )

    # -- buffered writes ---------------------------------------------------------------------
    def add_target(
        self,
        *,
        project_id: int,
        region_id: int,
        image_id: str,
        name: str,
        source: str,
        changes: Changes | str,
        before: Mapping[str, Any] | None,
        patch: Mapping[str, Any] | None,
        lock_task: str | None,
        plan_status: str,
        plan_reason: str | None,
        plan_detail: str | None,
        expect: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffer a planned target. ``expect`` (undo): the patch the undone run sent, which
        the image must still show when it is sent (read again on resume or after a lock)."""
        if isinstance(changes, str):
            changes_text = changes
        elif changes is self._last_changes[0]:  # query targets share the job's changes
            changes_text = self._last_changes[1]
        else:
            changes_text = changes_to_json(changes)
            self._last_changes = (changes, changes_text)
        self._targets.append(
            (project_id, region_id, image_id, name, source, changes_text,
             _json(before), _json(patch), lock_task, plan_status, plan_reason,
             None if plan_detail is None else scrub(plan_detail), _json(expect))
        )
        if len(self._targets) >= self.batch:
            self._check()  # a plan stops at the first commit that failed
            self._wake.set()

    def add_outcome(self, seq: int, outcome: Outcome) -> None:
        """Buffer ``seq``'s final outcome (the last one given for a seq wins). Cheap: no I/O.

        Raises JournalFailed once a commit has failed: nothing more may be sent unrecorded.
        """
        if self._failed is not None:
            raise self._failure(self._failed)
        handed = self._handed.pop(seq, None)
        before, patch = outcome.before, outcome.patch
        if handed is None:
            before_text, patch_text = _json(before), _json(patch)
        else:
            # the state the plan read: NULL here, the target's row has it (reads COALESCE)
            before_text = None if before is handed[0] else _json(before)
            patch_text = handed[3] if patch is handed[2] else _json(patch)
        error = outcome.error
        self._outcomes.append(
            (seq, outcome.status, outcome.reason, _json(outcome.after), patch_text,
             outcome.attempts, outcome.http_status, outcome.lock_wait_s, outcome.duration_ms,
             None if error is None else scrub(error), time.time(), before_text)
        )
        if len(self._outcomes) >= self.batch:
            self._wake.set()

    def _write(self, *rows: Any) -> None:  # _write_locked's arguments
        with self._db:
            self._write_locked(*rows)

    def _write_locked(
        self, targets: list[tuple[Any, ...]], outcomes: list[tuple[Any, ...]],
        counted: tuple[Any, ...] | None = None, seconds: list[timeline.Row] | None = None,
    ) -> None:
        conn = self._conn
        conn.execute("BEGIN")
        try:
            timeline.write(conn, seconds)  # the report's seconds, if any
            if counted is not None:
                conn.execute(processes.UPDATE, counted)
            if targets:
                # a target staged twice (resume of an unfinished plan) keeps its first row;
                # plan-time outcomes find their target's seq by its key
                conn.executemany(
                    "INSERT OR IGNORE INTO targets (project_id, region_id, image_id, name,"
                    " source, changes, before, patch, lock_task, plan_status, plan_reason,"
                    " plan_detail, expect) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    targets,
                )
                finals = [t for t in targets if t[9] not in ("planned", "pending")]
                if finals:
                    # from the kept row: a target first planned to change stays pending
                    now = time.time()
                    conn.executemany(
                        "INSERT OR IGNORE INTO outcomes (seq, status, reason, after, patch,"
                        " attempts, http_status, lock_wait_s, duration_ms, error, finished_at,"
                        " before) SELECT seq, plan_status, plan_reason, before, NULL, 0, NULL,"
                        " 0, 0, plan_detail, ?, before FROM targets WHERE project_id=?"
                        " AND region_id=? AND image_id=?"
                        " AND plan_status NOT IN ('planned', 'pending')",
                        [(now, t[0], t[1], t[2]) for t in finals],
                    )
            if outcomes:
                conn.executemany(
                    "INSERT OR REPLACE INTO outcomes (seq, status, reason, after, patch,"
                    " attempts, http_status, lock_wait_s, duration_ms, error, finished_at,"
                    " before) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    outcomes,
                )
            conn.execute("COMMIT")
        except BaseException:
            # a failed COMMIT (disk full) may have rolled back already: the first error is
            # the one that counts, never "cannot rollback - no transaction is active"
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    async def room(self) -> None:
        """Wait for the writer when eight batches of planned targets wait for it (a plan
        faster than the disk): the buffer, and so memory, stays flat in the plan's size."""
        if len(self._targets) >= 8 * self.batch:
            await self.flush()

    async def flush(self) -> None:
        """Commit what is buffered (in a thread: the loop never waits on the disk).

        Cancelling it does not cancel the commit under way: its rows are still written.
        """
        await self._flush(rows=True)

    async def _flush(self, *, rows: bool) -> None:
        self._check()
        async with self._lock:
            targets: list[tuple[Any, ...]] = []
            outcomes: list[tuple[Any, ...]] = []
            if rows:
                targets, self._targets = self._targets, []
                outcomes, self._outcomes = self._outcomes, []
                self._wake.clear()
            counted = self._counters()
            seconds = self._timeline.take() if self._timeline else None
            if targets or outcomes or counted or seconds:
                # shielded: a cancelled flush must not cancel a commit whose thread has not
                # started yet (its rows would be lost); the thread lock orders the commits
                write = asyncio.ensure_future(
                    asyncio.to_thread(self._write, targets, outcomes, counted, seconds))
                write.add_done_callback(self._written)
                try:
                    await asyncio.shield(write)
                except sqlite3.Error as exc:
                    raise self._failure(exc) from None

    def _written(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and isinstance(write.exception(), sqlite3.Error):
            self._failed = write.exception()

    def flush_sync(self) -> None:
        self._check()
        targets, self._targets = self._targets, []
        outcomes, self._outcomes = self._outcomes, []
        counted = self._counters(force=True)  # the last word on this process's time too
        seconds = self._timeline.take(final=True) if self._timeline else None
        if targets or outcomes or counted or seconds:
            try:
                self._write(targets, outcomes, counted, seconds)
            except sqlite3.Error as exc:
                self._failed = exc
                raise self._failure(exc) from None

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failure(self._failed)

    def _failure(self, exc: BaseException) -> BulkTaggerError:
        """What a failed commit raises: the volume's plain error (full, not writable), or
        JournalFailed for anything else."""
        return volume_error(exc, self.run_dir.parent) or JournalFailed(
            f"the journal cannot be written: {exc}")

    async def _writer_loop(self) -> None:
        clock = time.monotonic
        last = clock()
        while not self._stopping:
            step = min(self.flush_s, processes.COUNTERS_S) if self._process else self.flush_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), step)
            try:
                if self._wake.is_set() or clock() - last >= self.flush_s:
                    self._wake.clear()
                    last = clock()
                    await self.flush()
                else:  # between batches: only this process's counters, when they moved
                    await self._flush(rows=False)
            except BulkTaggerError:
                return  # add_outcome and flush raise it from now on

    # -- the processes that worked the run ----------------------------------------------------
    def track_process(self, counters: processes.Counters, started_at: datetime) -> None:
        """Record this process; from now on every commit carries what ``counters`` says."""
        with self._db:
            self._process = (processes.create(self._conn, started_at), counters)

    def track_timeline(self, sample: timeline.Sample) -> None:
        """From now on every commit carries the seconds ended since (worker.timeline)."""
        self._execute(timeline.SCHEMA)
        self._timeline = timeline.Timeline(sample)

    def _counters(self, *, force: bool = False) -> tuple[Any, ...] | None:
        """This process's counters as a row update, or None when unchanged since the last."""
        if self._process is None:
            return None
        requests, running_s = self._process[1]()
        counted = (_dumps(requests), round(running_s, 3), self._process[0])
        if not force and self._counted is not None and counted[0] == self._counted[0]:
            return None  # no request since: the time alone is not worth a commit
        self._counted = counted
        return counted

    def earlier_processes(self) -> dict[str, Any] | None:
        """The processes that worked this run before this one, added up (worker.processes)."""
        with self._db:
            return processes.earlier(self._conn, self._process[0] if self._process else -1)

    def start_writer(self) -> None:
        if self._writer is None:
            self._stopping = False
            self._writer = asyncio.get_running_loop().create_task(self._writer_loop())

    async def stop_writer(self) -> None:
        """Stop the batching task (letting a commit under way finish) and commit the rest."""
        if self._writer is not None:
            self._stopping = True
            self._wake.set()
            await asyncio.shield(self._writer)
            self._writer = None
        await asyncio.shield(self.flush())

    def close(self) -> None:
        """Commit the rest and close (waits for a commit a cancelled flush left running)."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.flush_sync()
        finally:
            with self._db:
                self._conn.close()
            self._closed = True

    def compact(self, exported: int) -> bool:
        """Compact a finished run's journal whose ``results.jsonl.gz`` holds its ``exported``
        rows (call after ``finish_run``): ``record.compact``. False: left whole."""
        if not self.compacted:
            self.flush_sync()
            with self._db:
                try:
                    self.compacted = record.compact(self._conn, self.run_dir, exported)
                except sqlite3.Error as exc:  # no room to compact in (disk full): left whole
                    if volume_error(exc, self.run_dir.parent) is None:
                        raise
        return self.compacted

    # -- the apply phase's reads: pending targets handed out --------------------------------
    def iter_pending(self, chunk: int = 1000) -> Iterator[Pending]:
        """Planned targets with no committed outcome, in plan order, read in chunks (what
        ``add_outcome`` buffered after this started may still come out: the pool reads a
        stream it alone ends)."""
        for rows in self._chunks(_PENDING + " AND t.seq > ? ORDER BY t.seq LIMIT ?", chunk):
            yield from self._hand(rows)

    def _hand(self, rows: list[Any]) -> Iterator[Pending]:
        handed = self._handed
        for seq, p, r, image_id, name, changes, before, patch, lock_task, expect in rows:
            item = Pending(
                # ``before`` stays in the journal: the outcome does not carry it
                seq, p, r, image_id, name or "", changes_from_json(changes),
                None, load_json(patch), lock_task, load_json(expect),
            )
            handed[seq] = (item.before, before, item.patch, patch)
            yield item

    def pending_keys(self, chunk: int = 5000) -> Iterator[tuple[int, int, str, str]]:
        """(project, region, image, seq as text) of every pending target, in plan order."""
        for rows in self._chunks(_PENDING + " AND t.seq > ? ORDER BY t.seq LIMIT ?", chunk):
            for seq, p, r, image_id, *_ in rows:
                yield p, r, image_id, str(seq)

    def pending_of(self, seqs: list[int]) -> list[Pending]:
        """The targets among ``seqs`` still pending, in plan order (handed out as by
        ``iter_pending``)."""
        if not seqs:
            return []
        conn = self._reader()
        try:
            marks = ",".join("?" * len(seqs))
            rows = conn.execute(
                _PENDING + f" AND t.seq IN ({marks}) ORDER BY t.seq", seqs).fetchall()
        finally:
            conn.close()
        return list(self._hand(rows))

"""The runs in the state folder: the list (``bulk-tagger runs``), retention (``bulk-tagger
prune``, and ``--keep-days`` at the start of every run and undo), and the unfinished run
``--resume`` continues (``find_resumable``).

A run folder is a child of the state folder holding a ``journal.sqlite`` with its run row;
anything else in the state folder is neither listed nor touched. A run is *finished* once it
has an exit code other than 75; pruning deletes finished runs only, and never:

- an unfinished run (killed, or exit 75): ``--resume`` continues it;
- a run a live process holds (the OS lock on its ``run.lock``, taken here too while the
  folder is deleted, so no process can start on it meanwhile);
- a run with an unfinished undo: resuming that undo reads the run's record.

A run's age is counted from when it finished (else started).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker import safety, units
from worker.errors import ExitCode, JobError
from worker.journal import read_run_info
from worker.runlock import Holder, RunHeld, RunLock, is_held
from worker.statevol import folder_bytes

#: a run's exit code while it may go on (``--resume``): none yet, or interrupted
UNFINISHED = (None, ExitCode.INTERRUPTED)


@dataclass(frozen=True)
class RunEntry:
    """One run folder as ``runs`` lists it."""

    run_id: str
    job: str
    kind: str
    started_at: str
    finished_at: str | None
    exit_code: int | None
    duration_s: float | None
    counts: dict[str, int]
    bytes: int
    parent_run_id: str | None = None
    shard: str | None = None
    #: the live process that holds the run's lock (runlock.is_held), if one does
    holder: Holder | None = None
    path: Path = field(default=Path(), compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.exit_code not in UNFINISHED

    @property
    def running(self) -> bool:
        """A live process works it: it holds the lock, and the run has no final exit code."""
        return self.holder is not None and not self.finished

    def moment(self) -> datetime:
        """When it finished (else started), as an aware UTC datetime."""
        return parse_time(self.finished_at or self.started_at)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        data["finished"] = self.finished
        data["running"] = self.running
        return data


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _entry(child: Path) -> RunEntry | None:
    if child.is_symlink() or not child.is_dir():
        return None
    info = read_run_info(child)
    try:  # a run row without a readable start is not a run this module counts or deletes
        parse_time(str(info["started_at"]))
        if info.get("finished_at"):
            parse_time(str(info["finished_at"]))
    except (KeyError, TypeError, ValueError):
        return None
    summary: dict[str, Any] = info["summary"] if isinstance(info.get("summary"), dict) else {}
    counts = {str(k): int(v) for k, v in (summary.get("counts") or {}).items() if v}
    duration = summary.get("duration_s")
    return RunEntry(
        run_id=str(info.get("run_id") or child.name), job=str(info.get("job_name") or ""),
        kind=str(info.get("kind") or ""), started_at=str(info["started_at"]),
        finished_at=info.get("finished_at"), exit_code=info.get("exit_code"),
        duration_s=float(duration) if isinstance(duration, int | float) else None,
        counts=counts, bytes=folder_bytes(child), parent_run_id=info.get("parent_run_id"),
        shard=info.get("shard"), holder=is_held(child), path=child,
    )


def list_runs(state_dir: Path) -> list[RunEntry]:
    """Every run in ``state_dir``, newest (by start) first."""
    if not state_dir.is_dir():
        return []
    entries = [e for e in map(_entry, state_dir.iterdir()) if e is not None]
    entries.sort(key=lambda e: (e.started_at, e.run_id), reverse=True)
    return entries


@dataclass
class PruneResult:
    """What ``prune`` deleted (or, dry, would delete) and what it kept back, and why."""

    pruned: list[RunEntry] = field(default_factory=list)
    kept: list[tuple[RunEntry, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.pruned)


def select(
    entries: Sequence[RunEntry], *, older_than: timedelta | None, keep_last: int | None,
    now: datetime, exclude: str | None = None,
) -> tuple[list[RunEntry], list[tuple[RunEntry, str]]]:
    """(the finished runs to prune, those it would but may not with the reason).

    A finished run is pruned when it is older than ``older_than`` (where given) and not one of
    the ``keep_last`` newest finished runs (where given); with both, it must be both; with
    neither, none is (retention off).
    """
    if older_than is None and keep_last is None:
        return [], []
    protected = {e.parent_run_id for e in entries
                 if e.kind == "undo" and not e.finished and e.parent_run_id}
    finished = [e for e in entries if e.finished and e.run_id != exclude]
    finished.sort(key=lambda e: (e.moment(), e.run_id), reverse=True)
    chosen: list[RunEntry] = []
    kept: list[tuple[RunEntry, str]] = []
    for rank, entry in enumerate(finished):
        if keep_last is not None and rank < keep_last:
            continue
        if older_than is not None and now - entry.moment() <= older_than:
            continue
        if entry.run_id in protected:
            kept.append((entry, "its undo is unfinished"))
        else:
            chosen.append(entry)
    return chosen, kept


def prune(
    state_dir: Path, *, older_than: timedelta | None, keep_last: int | None = None,
    dry_run: bool = False, now: datetime | None = None, exclude: str | None = None,
) -> PruneResult:
    """Delete the finished runs ``select`` chooses (see the module's doc for what never is)."""
    now = now or datetime.now(UTC)
    chosen, kept = select(list_runs(state_dir), older_than=older_than, keep_last=keep_last,
                          now=now, exclude=exclude)
    result = PruneResult(kept=kept)
    for entry in chosen:
        if dry_run:
            if is_held(entry.path) is not None:
                result.kept.append((entry, "a live process holds it"))
            else:
                result.pruned.append(entry)
            continue
        try:
            lock = RunLock.acquire(entry.path, run_id=entry.run_id, command="bulk-tagger prune")
        except RunHeld:
            result.kept.append((entry, "a live process holds it"))
            continue
        try:
            # read again under the lock: a process may have reopened it meanwhile
            if read_run_info(entry.path).get("exit_code") in UNFINISHED:
                result.kept.append((entry, "it is unfinished"))
            else:
                shutil.rmtree(entry.path)
                result.pruned.append(entry)
        finally:
            lock.release()
    return result


# -- what a person reads ------------------------------------------------------------------------
def format_runs(entries: Sequence[RunEntry], fmt: str, state_dir: Path) -> str:
    """``runs``' output (no trailing newline): a table, one line a run, newest first; or
    (``fmt`` json) a JSON list of the same."""
    if fmt == "json":
        return json.dumps([e.as_json() for e in entries], indent=2)
    if not entries:
        return f"no runs in {state_dir}"
    header = ("RUN", "JOB", "KIND", "STARTED", "DURATION", "EXIT", "COUNTS", "SIZE")
    rows = [header]
    for e in entries:
        exit_text = "-" if e.exit_code is None else str(e.exit_code)
        if e.running:
            exit_text = "running"
        elif not e.finished:
            exit_text += " (unfinished)"
        if e.holder is not None:  # its fields come from the lock file: shown escaped
            held = safety.printable(e.holder.describe())
            exit_text += f" ({'' if e.running else 'held by '}{held})"
        counts = " ".join(f"{k}={v}" for k, v in e.counts.items()) or "-"
        took = "-" if e.duration_s is None else units.duration_text(e.duration_s)
        rows.append((e.run_id, e.job, e.kind, e.started_at, took, exit_text, counts,
                     units.size_text(e.bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def format_prune(result: PruneResult, *, dry_run: bool) -> str:
    verb = "would delete" if dry_run else "deleted"
    lines = [f"{verb} {e.run_id} ({e.job}, {e.kind}, finished {e.finished_at}, "
             f"{units.size_text(e.bytes)})" for e in result.pruned]
    lines += [f"kept {e.run_id}: {why}" for e, why in result.kept]
    lines.append(f"{verb} {len(result.pruned)} run(s), {units.size_text(result.bytes)}")
    return "\n".join(lines)


# -- the run --resume continues -----------------------------------------------------------------
def find_resumable(
    state_dir: Path, *, job_name: str, job_hash: str, kind: str, shard: str | None,
    within: timedelta,
) -> str | None:
    """The latest unfinished run of this job (and shard) started within ``within``.

    Unfinished: no exit code yet (killed) or 75 (interrupted). Raises JobError when that run
    was made from a different job file: resuming it would mix two jobs in one record. For
    ``undo`` runs ``job_hash`` is the undone run's id, and only undos of that run count.
    """
    if not state_dir.is_dir():
        return None
    cutoff = datetime.now(UTC) - within
    best: tuple[str, dict[str, Any]] | None = None
    for child in state_dir.iterdir():
        info = read_run_info(child)
        if not info or info["kind"] != kind or info["job_name"] != job_name:
            continue
        if info["shard"] != shard:
            continue
        if kind == "undo" and info["job_hash"] != job_hash:
            continue
        if info["exit_code"] not in UNFINISHED:
            continue
        started = datetime.fromisoformat(info["started_at"].replace("Z", "+00:00"))
        if started < cutoff:
            continue
        if best is None or info["started_at"] > best[1]["started_at"]:
            best = (child.name, info)
    if best is None:
        return None
    if best[1]["job_hash"] != job_hash:
        raise JobError(
            f"the unfinished run {best[0]} was made from another version of this job file",
            field="--resume",
            hint="finish it with the old file, or start afresh without --resume "
            "(or wait until it is older than --resume-within)",
        )
    return best[0]


def locate_run(state_dir: Path, ref: str) -> tuple[Path, str, dict[str, Any]]:
    """(state dir, run id, run info) of ``ref``: a run's id in ``state_dir``, or the path of
    a run's folder (as a command prints it: ``report: runs/<id>``); either way the id is
    checked and the folder must be our own real one (``safety.run_dir``). JobError where
    there is no such run."""
    folder = Path(ref)
    if os.sep in ref and (folder / "journal.sqlite").is_file():  # else: checked as an id
        state_dir, ref = folder.parent, folder.name
    info = read_run_info(safety.run_dir(state_dir, ref, field="RUN_ID"))
    if not info:
        raise JobError(f"no run {ref!r} in {state_dir}", field="RUN_ID",
                       hint="a run's id (`ls` the state dir) or the path of its folder")
    return state_dir, ref, info


def find_undo(state_dir: Path, run_id: str) -> tuple[str, int] | None:
    """(id, exit code) of the latest undo of ``run_id`` that ended (exit 0 or 1), or None.
    An undo run's ``job_hash`` is the id of the run it undoes."""
    if not state_dir.is_dir():
        return None
    best: tuple[str, int, str] | None = None
    for child in state_dir.iterdir():
        info = read_run_info(child)
        if not info or info["kind"] != "undo" or info["job_hash"] != run_id:
            continue
        if info["exit_code"] in (0, 1) and (best is None or info["finished_at"] > best[2]):
            best = (child.name, int(info["exit_code"]), str(info["finished_at"]))
    return None if best is None else best[:2]

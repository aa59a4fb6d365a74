"""The state volume: a full or unwritable one named plainly, and a run refused before it starts
when it clearly cannot fit.

``volume_error`` turns the error a write met (SQLite's, or an ``OSError`` of the exports)
into ``StateVolumeError`` when its cause is the volume: full (``ENOSPC``, ``EDQUOT``,
``SQLITE_FULL``, or an I/O error while the volume has next to no space left) or not writable
(``EACCES``, ``EPERM``, ``EROFS``, ``SQLITE_READONLY``, ``SQLITE_CANTOPEN``, ``SQLITE_PERM``).
Exit 74 (``EX_IOERR``): the Job fails at once instead of retrying into the same wall (README:
exit codes); what the journal committed stays, and once space is freed ``--resume`` finishes.

``check_space`` runs before planning: a run needs about ``bytes per target`` x ``targets``
(the journal, its WAL and the exports), measured from the latest run of the same job in the
state folder that holds a summary (a resumed run: its own folder), else
``DEFAULT_BYTES_PER_TARGET``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

from worker.errors import BulkTaggerError, ExitCode

#: Above what a run's folder took per target (journal + exports: 2,420 to 2,530 bytes) in
#: the run of tests/test_statevol.py, which keeps it honest.
DEFAULT_BYTES_PER_TARGET = 3000
#: A run always needs this much on top (the WAL's growth between checkpoints, SQLite's pages).
HEADROOM_BYTES = 256 << 10

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_FULL_SQLITE = frozenset({sqlite3.SQLITE_FULL})
_DENIED_SQLITE = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM})
_IOERR_SQLITE = frozenset({sqlite3.SQLITE_IOERR})


class StateVolumeError(BulkTaggerError):
    """The state volume is full or cannot be written: the run stopped, its record kept."""

    exit_code = ExitCode.STATE_VOLUME


def free_bytes(directory: Path) -> int:
    """Bytes free for this user on ``directory``'s file system (its nearest existing parent)."""
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def full(directory: Path) -> StateVolumeError:
    return StateVolumeError(
        f"the state volume {directory} is full ({free_bytes(directory)} bytes free): the run "
        "stopped, what it recorded is kept; free space, then `--resume` finishes it"
    )


def denied(directory: Path) -> StateVolumeError:
    return StateVolumeError(
        f"cannot write {directory}: permission denied (the state volume must be writable by "
        "this user: fsGroup, or the volume's owner)"
    )


def volume_error(exc: BaseException, directory: Path) -> StateVolumeError | None:
    """The plain error for ``exc`` when the state volume caused it, else None."""
    if isinstance(exc, StateVolumeError):
        return exc
    if isinstance(exc, OSError):
        if exc.errno in _FULL_ERRNOS:
            return full(directory)
        if exc.errno in _DENIED_ERRNOS:
            return denied(directory)
        return None
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in _FULL_SQLITE:
            return full(directory)
        if primary in _DENIED_SQLITE or not os.access(directory, os.W_OK):
            return denied(directory)
        if primary in _IOERR_SQLITE and free_bytes(directory) < HEADROOM_BYTES:
            return full(directory)
    return None


def folder_bytes(folder: Path) -> int:
    total = 0
    for child in folder.iterdir():
        try:
            if child.is_file():
                total += child.stat().st_size
        except OSError:
            continue
    return total


def measured_bytes_per_target(state_dir: Path, job_name: str) -> tuple[float, int]:
    """(bytes per target, targets) of the latest run of ``job_name`` with a summary, or
    (DEFAULT_BYTES_PER_TARGET, 0) where there is none."""
    best: tuple[str, float, int] | None = None
    try:
        folders = list(state_dir.iterdir())
    except OSError:
        folders = []
    for folder in folders:
        try:
            summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict) or summary.get("job") != job_name:
            continue
        counts = summary.get("counts") or {}
        targets = sum(v for v in counts.values() if isinstance(v, int))
        started = str(summary.get("started_at") or "")
        if targets and (best is None or started > best[0]):
            # a finished run's folder is compacted: its size while it ran is in the summary
            size = max(folder_bytes(folder), int(summary.get("record_bytes_peak") or 0))
            best = (started, size / targets, targets)
    if best is None:
        return float(DEFAULT_BYTES_PER_TARGET), 0
    return best[1], best[2]


def check_space(directory: Path, *, targets: int, bytes_per_target: float,
                held: int = 0) -> None:
    """Raise ``StateVolumeError`` when ``targets`` clearly cannot fit: the need, less what the
    run's folder ``held`` already, is over what is free."""
    need = int(targets * bytes_per_target) - held + HEADROOM_BYTES
    free = free_bytes(directory)
    if free < need:
        size = (f"a run of {targets} targets needs about {need} ({bytes_per_target:.0f} bytes "
                "a target, as measured)") if targets else f"a run needs at least {need}"
        raise StateVolumeError(
            f"the state volume {directory} is full for this run: {free} bytes free, and {size}; "
            "nothing was sent. Free space (or delete old run folders), then run again "
            "(`--resume` for an interrupted run)"
        )

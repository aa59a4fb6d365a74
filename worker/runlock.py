"""One owner per run: an OS lock on ``<run-dir>/run.lock`` while a process works the run.

``run``, ``undo`` and every ``--resume`` take it before they write the journal or send
anything; a second process that tries gets ``RunHeld`` (exit 75) naming the holder. The lock
is ``flock(LOCK_EX | LOCK_NB)`` on a file the holder keeps open: the kernel drops it when the
holder's last descriptor closes, however the process ends (exit, SIGKILL, the OOM killer), so
no stale lock outlives its holder. The file itself stays (empty of meaning once unlocked); the
holder writes who it is into it (pid, host, since, command) for the message of the next one.

flock locks an open file description, not a process: a second ``open`` of the file in the
holding process conflicts too, so ``is_held`` also answers truthfully inside the holder, and
closing that probe never drops the holder's lock (as closing any descriptor would with fcntl's
POSIX locks).

Over a network file system (README: "One owner per run"): Linux NFS clients turn flock into
an NFS byte-range lock the server arbitrates, so it holds across nodes on NFSv4 (and on v3
with a lock manager; never with the ``nolock`` / ``local_lock`` mount options), and a lost
node's lock is freed when its lease ends (NFSv4: about 90 s), not at once. CephFS arbitrates
flock across clients too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import orjson

from worker.errors import BulkTaggerError, ExitCode

LOCK_NAME = "run.lock"


class RunHeld(BulkTaggerError):
    """Another live process works this run; nothing was sent (exit 75: try again later)."""

    exit_code = ExitCode.INTERRUPTED


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a run, as its lock file says (fields may be empty if it could not be read)."""

    pid: int | None
    host: str
    since: str
    command: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "a process"
        host = f" on {self.host}" if self.host else ""
        since = f" since {self.since}" if self.since else ""
        command = f" ({self.command})" if self.command else ""
        return f"{pid}{host}{since}{command}"


def _read_holder(path: Path) -> Holder:
    data: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = orjson.loads(path.read_bytes() or b"{}")
        if isinstance(loaded, dict):
            data = loaded
    pid = data.get("pid")
    return Holder(
        pid=pid if isinstance(pid, int) else None,
        host=str(data.get("host") or ""),
        since=str(data.get("since") or ""),
        command=str(data.get("command") or ""),
    )


def _holder_of_held(path: Path) -> Holder:
    """The holder of a lock just found held. It writes who it is right after it takes the
    lock, so a refused process that reads in between finds the file empty: read again for
    up to a fifth of a second before saying "a process"."""
    holder = _read_holder(path)
    for _ in range(20):
        if holder.pid is not None:
            break
        time.sleep(0.01)
        holder = _read_holder(path)
    return holder


def _try_lock(fh: IO[bytes]) -> bool:
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def is_held(run_dir: Path) -> Holder | None:
    """The live holder of ``run_dir``, or None when no process works it (safe to prune).

    Never creates anything: a run folder without a lock file has no holder.
    """
    path = run_dir / LOCK_NAME
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return None
    with fh:
        if _try_lock(fh):
            return None  # closing the probe lets go at once
        return _holder_of_held(path)


class RunLock:
    """The held lock of one run; ``release()`` (or the process's end) lets go of it."""

    def __init__(self, run_dir: Path, fh: IO[bytes]) -> None:
        self.run_dir = run_dir
        self._fh: IO[bytes] | None = fh

    @classmethod
    def acquire(
        cls, run_dir: Path, *, run_id: str, command: str = "", latest: bool = False
    ) -> RunLock:
        """Take ``run_dir``'s lock (the folder must exist) or raise ``RunHeld`` at once."""
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fh = os.fdopen(fd, "r+b")
        try:
            if not _try_lock(fh):
                holder = _holder_of_held(path)
                raise RunHeld(held_message(run_id, holder, latest=latest))
            fh.truncate(0)
            fh.write(orjson.dumps({
                "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "command": command or " ".join(["bulk-tagger", *sys.argv[1:2]]),
            }))
            fh.flush()
        except BaseException:
            fh.close()
            raise
        return cls(run_dir, fh)

    @property
    def held(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()


def held_message(run_id: str, holder: Holder, *, latest: bool = False) -> str:
    """What a refused process says, in the way Terraform's state-lock error reads (``latest``:
    ``--resume`` found the run itself, and starts no parallel one beside it)."""
    which = f"the latest unfinished run of this job, {run_id}," if latest else f"run {run_id}"
    parallel = " No parallel new run was started." if latest else ""
    return (
        f"{which} is locked: another process works it: {holder.describe()}.{parallel} Nothing was "
        "sent. The lock protects the run's journal from two writers and the API from twice "
        "the rate; it is let go the moment its holder ends, even when killed. Wait for that "
        "process to end, then `--resume` continues what is left; or stop it (SIGTERM) if it "
        "should not run"
    )

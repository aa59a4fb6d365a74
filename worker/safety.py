"""What the worker does not take on trust (README: threat model).

- Ids that go into a URL path: an image id is 1 to 128 characters of a safe alphabet (never
  ``.`` or ``..``; none that a URL path would quote), a task id a UUID.
- Run ids name a folder: one path segment of a safe alphabet, at most 128 characters.
- The state folder: one writable by every user is refused; a run folder or journal that is a
  symlink, or that belongs to another user, is refused; nothing inside is followed.
- Text a person reads: control characters (C0, C1, bidi overrides) are shown escaped.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from worker.errors import JobError

#: an image id as it may go into a path: never "." or "..", no "/", "?", "#", "%"
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{0,127}")
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_RULE = ("1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter"
               " or digit")


def image_id_problem(image_id: object) -> str | None:
    """Why ``image_id`` may not go into a URL path, or None if it may."""
    if not isinstance(image_id, str) or not _IMAGE_ID.fullmatch(image_id):
        return (f"unusable image id {excerpt(str(image_id))}: 1 to 128 characters of"
                " A-Z, a-z, 0-9, '.', '_', '~' and '-', starting with a letter or digit")
    return None


def is_task_id(task_id: object) -> bool:
    return isinstance(task_id, str) and UUID.fullmatch(task_id) is not None


# -- run ids and the state folder ----------------------------------------------------------------
def check_run_id(run_id: str, *, field: str = "--run-id") -> str:
    if not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise JobError(f"{excerpt(run_id)} is not a run id", field=field, hint=RUN_ID_RULE)
    return run_id


def _os_error(exc: OSError, path: Path, field: str) -> JobError:
    return JobError(f"{exc.strerror or type(exc).__name__}: {printable(str(path))}",
                    field=field)


def state_dir(path: Path) -> Path:
    """The state folder, created 0700 if missing; refused if any user may write to it.

    One that exists is not chmodded: a volume's root may belong to another user (Kubernetes'
    fsGroup), who alone may; a group-writable one is accepted for that reason (the run
    folders inside are then checked one by one). An OSError (a read-only or full volume) is
    let through for ``worker.statevol`` to name.
    """
    if "\0" in str(path):
        raise JobError("the path holds a NUL character", field="--state-dir")
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    st = path.stat()
    shown = printable(str(path))
    if not stat.S_ISDIR(st.st_mode):
        raise JobError(f"{shown} exists and is not a directory", field="--state-dir")
    if st.st_mode & stat.S_IWOTH:
        raise JobError(
            f"{shown} is writable by every user: anyone could plant a run in it",
            field="--state-dir", hint=f"chmod o-w {shown}, or choose another folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return path


def _owned(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid()


def run_dir(state: Path, run_id: str, *, field: str = "--run-id") -> Path:
    """``state/run_id`` with the id checked; if it exists, it must be our own real folder."""
    path = state / check_run_id(run_id, field=field)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise _os_error(exc, path, field) from None
    _trusted(path, st, directory=True, field=field)
    return path


def _trusted(path: Path, st: os.stat_result, *, directory: bool, field: str) -> None:
    shown = printable(str(path))
    if stat.S_ISLNK(st.st_mode):
        raise JobError(f"{shown} is a symlink: nothing in the state folder is followed",
                       field=field, hint="remove it")
    if directory and not stat.S_ISDIR(st.st_mode):
        raise JobError(f"{shown} is not a directory", field=field)
    if not directory and not stat.S_ISREG(st.st_mode):
        raise JobError(f"{shown} is not a regular file", field=field)
    if not _owned(st):
        raise JobError(
            f"{shown} belongs to user {st.st_uid}, not to this one ({os.geteuid()}):"
            " it is not used", field=field, hint="a run is only read by the user who made it")


def private_run_dir(path: Path) -> None:
    """Create the run folder 0700, or check that the existing one is ours and real (and make
    it 0700); then check that no file SQLite opens in it is a symlink or another's."""
    try:
        os.makedirs(path.parent, 0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _os_error(exc, path, "--state-dir") from None
    _trusted(path, os.lstat(path), directory=True, field="--run-id")
    os.chmod(path, 0o700, follow_symlinks=False)
    for name in ("journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm", "stage.sqlite",
                 "run.lock"):
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            continue
        _trusted(path / name, st, directory=False, field="--run-id")


def ours(path: Path, *, directory: bool) -> bool:
    """Whether ``path`` is a real folder (or regular file) of ours: not a symlink, not another
    user's (a listing skips the others)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    return kind(st.st_mode) and _owned(st)


def create_private_file(path: Path) -> None:
    """Create ``path`` 0600 if missing, never through a symlink (an empty file is a valid SQLite
    database, and SQLite gives its -wal and -shm files the database file's mode)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


# -- files a job names, and the key file --------------------------------------------------------
_SPECIAL = ("/proc", "/sys", "/dev")


def is_special(path: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies under /proc, /sys or /dev."""
    real = os.path.realpath(path)
    return any(real == top or real.startswith(top + "/") for top in _SPECIAL)


def open_regular(path: Path, *, field: str, file: str | None = None) -> int:
    """A descriptor of ``path`` opened for reading, if it is a regular file outside /proc,
    /sys and /dev (``JobError`` else): a FIFO would hang the read, /dev/zero never ends,
    /proc/self/environ holds the key."""
    shown = file or printable(str(path))
    if is_special(path):
        raise JobError(f"{excerpt(os.path.realpath(path), 60)} is under /proc, /sys or /dev:"
                       " not read", file=shown, field=field, hint="name a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as exc:
        raise JobError(f"cannot read it: {exc.strerror}", file=shown, field=field) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JobError("not a regular file: not read", file=shown, field=field,
                       hint="name a regular file")
    os.set_blocking(fd, True)
    return fd


def read_small_file(path: Path, *, field: str, limit: int, file: str | None = None) -> bytes:
    """The bytes of a regular file (see ``open_regular``) of at most ``limit`` bytes."""
    fd = open_regular(path, field=field, file=file)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise JobError(f"over {limit:,} bytes: not read", file=file or printable(str(path)),
                       field=field)
    return data


_MISTAKES = frozenset((errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR,
                       errno.EROFS, errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.EEXIST))


def operator_mistake(exc: BaseException) -> str | None:
    """A plain message for an error the operator made (a path that cannot be used, a NUL in
    an argument), or None for what would be a bug."""
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return "an argument or path holds a NUL character"
    if isinstance(exc, OSError) and exc.errno in _MISTAKES:
        where = f": {printable(str(exc.filename))}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return None


# -- text a person reads ---------------------------------------------------------------------------
#: C0 (but tab and newline), DEL, C1, and the bidi and zero-width controls a terminal honours
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_JSON = re.compile("[\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_ALL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with control characters shown as ``\\x1b`` / ``\\u202e`` (tab and newline
    kept only if ``newlines``)."""
    pattern = _CONTROL if newlines else _CONTROL_ALL
    if pattern.search(text) is None:
        return text
    return pattern.sub(_escape, text)


def json_printable(line: str) -> str:
    """A JSON text with C1 and bidi controls as ``\\u`` escapes (JSON escapes C0 already):
    the same JSON value, safe on a terminal."""
    return _CONTROL_JSON.sub(lambda m: f"\\u{ord(m.group(0)):04x}", line)


def has_control(text: str) -> bool:
    return _CONTROL_ALL.search(text) is not None


def excerpt(text: str, limit: int = 40) -> str:
    """A short, escaped, quoted excerpt of ``text`` for an error message."""
    cut = text[:limit]
    shown = printable(cut)
    return repr(shown) if len(text) <= limit else repr(shown) + f"... ({len(text)} characters)"

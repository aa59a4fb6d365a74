"""The exit codes and one exception tree for bulk-tagger.

``ExitCode`` is the one place the process's exit codes and their meanings are written (README,
"Exit codes", shows them as they are here).

    BulkTaggerError                 what aborts a command (exit_code says how it ends)
    ├── JobError          (2)       bad command line, job or selector file (file, line, field)
    ├── SafetyLimit       (3)       the plan has more changes than the job allows
    ├── CircuitOpen    (1|75)       the run stopped because its targets kept failing alike
    ├── Unreachable      (75)       the API gave no answer before the run began (the probe)
    ├── (runlock.RunHeld     75)    another live process works the run; nothing sent
    ├── (statevol.StateVolumeError 74)  the state volume is full or cannot be written
    └── ApiError                    an answer (or no answer) of the Gcore API
        ├── AuthFailed    (4)       401, or 403 on the run's reads: the run stops at once
        ├── RateLimited             429, carries retry_after (seconds)
        ├── Locked                  409, or an image whose task_id names a running task
        ├── Transient               408, 5xx, connection reset, timeouts: retried
        ├── NotFound                404: not retried
        ├── Rejected                400/403/422 on a write: not retried, the API's message kept
        └── BadAnswer               an answer too big, too deep, or not the shape the API sends

Per-target failures are not exceptions once the pool has handled them: they become outcomes.
No message built here ever contains the API key (the client never puts it anywhere but the
request header).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Rerun(StrEnum):
    """What running the same command again does after an exit code: what a Kubernetes Job's
    podFailurePolicy should do with it (README, "9. Exit codes, and what the CronJob does with
    them"; tests/test_deploy.py holds jobs/k8s and that table to ``ExitCode.rerun``)."""

    #: the run finished: another is a new run
    DONE = "done"
    #: it ends the same way (the input, the plan, the key, the full volume are as they were)
    SAME = "same"
    #: it resumes the run where it stopped
    RESUMES = "resumes"
    #: it may or may not (a bug; a prompt's Ctrl-C)
    UNKNOWN = "unknown"


class ExitCode(IntEnum):
    """How a command ends. Each code's ``meaning`` (markdown: README's and docs/job-file.md's
    "Exit codes" tables show it word for word, tests/test_docs.py holds them to it) and what a
    ``rerun`` of the command does (the Kubernetes Jobs' podFailurePolicy keys on it) are in
    ``_ABOUT``, below."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    SAFETY_LIMIT = 3
    AUTH_FAILED = 4
    INTERNAL = 70  # EX_SOFTWARE
    STATE_VOLUME = 74  # EX_IOERR
    INTERRUPTED = 75  # EX_TEMPFAIL
    ABORTED = 130  # 128 + SIGINT: click's Abort

    @property
    def meaning(self) -> str:
        return _ABOUT[self][0]

    @property
    def rerun(self) -> Rerun:
        return _ABOUT[self][1]


_ABOUT: dict[ExitCode, tuple[str, Rerun]] = {
    ExitCode.OK: ("every target ended updated, unchanged or skipped", Rerun.DONE),
    ExitCode.FAILED: (
        "the run finished and some targets failed (each has its record: "
        "`bulk-tagger report RUN_ID --format jsonl` lists them)",
        Rerun.DONE,
    ),
    ExitCode.BAD_INPUT: (
        "bad command line, job or selector file; a wrong base URL; a project or region the job "
        "names that the API does not list; a job file changed under `--resume`; a plan "
        "`run --plan` may not apply (nothing sent)",
        Rerun.SAME,
    ),
    ExitCode.SAFETY_LIMIT: (
        "safety limit: the plan is over `max_changes` / `max_changes_percent`, or a selector "
        "matched nothing under `require_matches` (nothing changed)",
        Rerun.SAME,
    ),
    ExitCode.AUTH_FAILED: (
        "the API refused the credentials (401, or 403 on the run's reads): the run stopped at "
        "once",
        Rerun.SAME,
    ),
    ExitCode.INTERNAL: (
        "an internal error (a bug: set `BULK_TAGGER_DEBUG=1` for the traceback and report it)",
        Rerun.UNKNOWN,
    ),
    ExitCode.STATE_VOLUME: (
        "the state volume is full or cannot be written, or refused before planning when the run "
        "clearly cannot fit (nothing sent); what was recorded is kept, and `--resume` finishes "
        "once space is freed",
        Rerun.SAME,
    ),
    ExitCode.INTERRUPTED: (
        "interrupted (SIGTERM/SIGINT), or the API unreachable (no answer to the first read, or "
        "past the retry budget): `--resume` goes on; or the run is held by another live process "
        "(nothing sent: try later)",
        Rerun.RESUMES,
    ),
    ExitCode.ABORTED: (
        "Ctrl-C outside a run's own handling (e.g. `validate`, `report`): nothing to resume",
        Rerun.UNKNOWN,
    ),
}


class BulkTaggerError(Exception):
    """Base of every error bulk-tagger raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class JobError(BulkTaggerError):
    """A bad job file, selector file or command line; nothing was sent.

    ``file``, ``line`` and ``field`` say where; ``hint`` says what would fix it.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.hint = hint
        #: further mistakes found with this one (``bulk-tagger validate`` lists them), and how
        #: many more were found past that list
        self.more: list[JobError] = []
        self.unlisted = 0
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}{field}{self.message}{hint}"


class SafetyLimit(BulkTaggerError):
    """The plan changes more images than ``max_changes`` / ``max_changes_percent`` allow."""

    exit_code = ExitCode.SAFETY_LIMIT


class CircuitOpen(BulkTaggerError):
    """Targets kept failing for the same reason; the run stopped instead of grinding on."""

    def __init__(self, message: str, *, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unreachable(BulkTaggerError):
    """The API gave no answer to the run's first reads (refused, timed out, a DNS failure
    that may pass): nothing was written; a retry later may find it."""

    exit_code = ExitCode.INTERRUPTED


class ApiError(BulkTaggerError):
    """An answer of the API that the caller must act on.

    ``status`` is the HTTP status (None where no answer came), ``message`` the API's own words
    (or a short description of a non-JSON body).
    """

    retryable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AuthFailed(ApiError):
    exit_code = ExitCode.AUTH_FAILED


class RateLimited(ApiError):
    retryable = True

    def __init__(self, message: str, *, status: int | None = 429, retry_after: float | None = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class Locked(ApiError):
    def __init__(self, message: str, *, status: int | None = 409, task_id: str | None = None):
        super().__init__(message, status=status)
        self.task_id = task_id


class Transient(ApiError):
    retryable = True


class NotFound(ApiError):
    pass


class Rejected(ApiError):
    pass


class BadAnswer(ApiError):
    """A 2xx answer the worker will not use: over the size cap, not JSON, nested too deep, or
    not shaped as the API documents it (an image without an id, tags that are not objects).
    Not retried: the target fails (``bad_answer``) or, on a list read, the run stops."""

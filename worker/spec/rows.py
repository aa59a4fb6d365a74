"""What the selector-file readers share: ``Row``, and ``_Rows`` (the file's name, the environment's
default IDs, the job's changes) with the row-level ID checks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from worker import safety
from worker.errors import JobError
from worker.models import Changes
from worker.spec.checks import PROJECT_ENV, REGION_ENV, _env_id, _kind, _Problem, _short
from worker.spec.models import FileSelector, Job
from worker.spec.translate import MAX_LISTED


@dataclass(frozen=True, slots=True)
class Row:
    """One row of a selector file: where the image is and the row's own changes.

    ``file`` is the selector's ``file`` as written in the job, ``line`` the row's first line.
    """

    project_id: int
    region_id: int
    image_id: str
    changes: Changes
    file: str
    line: int


_NO_CHANGES = Changes()
#: the most characters of a field an error shows (a header cell is cut shorter: CSV_SHOWN)
_FIELD_SHOWN = 64
#: the most characters of a CSV header cell an error shows: the file may be anything, the
#: key file included, and a header line is all of such a file
CSV_SHOWN = 16
_DIGITS = re.compile(r"[0-9]{1,18}")


class _Rows:
    """What every row reader needs: the file's name, env defaults, the job's changes."""

    def __init__(self, job: Job, selector: FileSelector, env: Mapping[str, str]) -> None:
        self.selector = selector
        self.file = selector.display
        self.env = env
        self.needs_changes = job.changes_model().is_empty()
        #: collecting (``check_selector_files(..., every=True)``): rows in error, read past
        self.errors: list[JobError] | None = None
        self.unlisted = 0

    def bad_row(self, exc: JobError) -> None:
        """A row in error: raised, or (collecting) listed, up to MAX_LISTED, then counted."""
        if self.errors is None:
            raise exc
        if len(self.errors) < MAX_LISTED:
            self.errors.append(exc)
        else:
            self.unlisted += 1

    def fail(
        self, message: str, line: int | None, field: str | None = None, hint: str | None = None
    ) -> NoReturn:
        # a field named by the file's own text (a header cell, a key) is shown as a short
        # escaped excerpt: the file may be anything, the key file included
        if field is not None and (len(field) > _FIELD_SHOWN or safety.has_control(field)):
            field = safety.excerpt(field, _FIELD_SHOWN)
        raise JobError(message, file=self.file, line=line, field=field, hint=hint)

    def default(self, column: str, line: int | None) -> int:
        var = PROJECT_ENV if column == "project_id" else REGION_ENV
        try:
            value = _env_id(self.env, var)
        except _Problem as exc:
            self.fail(exc.message, line, column)
        if value is None:
            self.fail(
                f"{column} is missing, and {var} is not set",
                line,
                column,
                hint=f"give every row a {column}, or set {var}",
            )
        return value

    def row(
        self, pid: int, rid: int, image_id: str, changes: Changes, *, line: int, field: str
    ) -> Row:
        if self.needs_changes and changes.is_empty():
            self.fail(
                "this row changes nothing, and the job's changes are empty: nothing to do",
                line,
                field,
                hint="give the row tags or fields to set, or add changes to the job",
            )
        return Row(pid, rid, image_id, changes, self.selector.file, line)


def _id_text(text: str, column: str) -> int:
    text = text.strip()
    if not text:
        raise _Problem("is empty", hint=f"every row needs a {column}")
    if not _DIGITS.fullmatch(text) or int(text) == 0:
        raise _Problem(f"must be an ID (a positive whole number), not {_short(text)}")
    return int(text)


def _image_id(value: object) -> str:
    if not isinstance(value, str):
        raise _Problem(f"must be text, not {_kind(value)}")
    value = value.strip()
    if not value:
        raise _Problem("is empty", hint="every row needs an image_id")
    if safety.image_id_problem(value) is not None:  # never "." or "..": it goes into a URL
        raise _Problem(
            f"{_short(value)} is not an image ID",
            hint="1 to 128 letters, digits and . _ ~ -, starting with a letter or digit",
        )
    return value

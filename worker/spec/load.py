"""The entry points: ``load_job`` reads and checks a job file; ``iter_rows`` streams a selector
file's rows; ``check_selector_files`` reads them all through."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from pydantic import (
    ValidationError,
)

from worker import safety
from worker.errors import JobError
from worker.spec.checks import _kind
from worker.spec.csv_rows import _csv_rows
from worker.spec.json_rows import _json_list_rows, _jsonl_rows
from worker.spec.models import _EXTENSIONS, FileSelector, Job
from worker.spec.rows import Row, _Rows
from worker.spec.source import _parse_json, _parse_yaml
from worker.spec.translate import _translate

#: The largest job file read (bytes): a job is a page of YAML, its rows live in selector files.
MAX_JOB_BYTES = 1024 * 1024


def _read_bytes(path: Path, display: str) -> bytes:
    """The job file's bytes: a regular file (not a FIFO, not under /dev, /proc or /sys) of at
    most ``MAX_JOB_BYTES``."""
    if not path.exists():
        raise JobError("no such file", file=display)
    if path.is_dir():
        raise JobError("is a folder, not a file", file=display)
    return safety.read_small_file(path, field="JOB", limit=MAX_JOB_BYTES, file=display)


def _decode(data: bytes, display: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise JobError("is not UTF-8 text", file=display, line=line) from None


def load_job(path: str | Path, *, env: Mapping[str, str] | None = None) -> Job:
    """Read, parse and check a job file; selector files are checked to exist, not read.

    ``env`` (default ``os.environ``) supplies ``GCORE_CLOUD_PROJECT_ID`` /
    ``GCORE_CLOUD_REGION_ID`` for queries that leave ``projects`` / ``regions`` out.
    """
    display = str(path)
    job_path = Path(path)
    suffix = job_path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise JobError(
            "a job file must be YAML or JSON",
            file=display,
            hint="name it .yaml, .yml or .json",
        )
    data = _read_bytes(job_path, display)
    text = _decode(data, display)
    if not text.strip():
        raise JobError("the job file is empty", file=display, hint="see jobs/demo.yaml")
    try:
        parse = _parse_json if suffix == ".json" else _parse_yaml
        tree, lines = parse(text, display)
    except RecursionError:
        raise JobError("is nested too deeply to read", file=display) from None
    if tree is None:
        raise JobError("the job file is empty", file=display, hint="see jobs/demo.yaml")
    if not isinstance(tree, dict):
        raise JobError(
            f"a job must be a mapping of name, targets, changes and options, not {_kind(tree)}",
            file=display,
            line=1,
        )
    context = {
        "env": os.environ if env is None else env,
        "base": job_path.parent,
        "display_base": os.path.dirname(display),
        "check_files": True,
    }
    try:
        job = Job.model_validate(tree, context=context)
    except ValidationError as exc:
        raise _translate(exc, display, lines) from None
    job._path = job_path.resolve()
    job._sha256 = hashlib.sha256(data).hexdigest()
    return job


_READERS: dict[str, Callable[[TextIO, _Rows], Iterator[Row]]] = {
    "csv": _csv_rows,
    "json": _json_list_rows,
    "jsonl": _jsonl_rows,
}


def iter_rows(
    job: Job, selector: FileSelector, *, env: Mapping[str, str] | None = None
) -> Iterator[Row]:
    """The rows of a selector file, streamed (flat memory whatever the size).

    Raises JobError (file, line, field) at the first bad row; rows before it have been yielded.
    ``env`` (default ``os.environ``) supplies project/region IDs that rows leave out.
    """
    return _read_rows(_Rows(job, selector, os.environ if env is None else env))


def _read_rows(rows: _Rows) -> Iterator[Row]:
    selector = rows.selector
    reader = _READERS[selector.format or _EXTENSIONS.get(selector.path.suffix.lower(), "csv")]
    if not selector.path.exists():
        rows.fail("no such file", None, hint=f"named by the job's target file: {selector.file}")
    if selector.path.is_dir():
        rows.fail("is a folder, not a file", None)
    # a regular file only, never under /proc, /sys or /dev (a FIFO would hang, and
    # /proc/self/environ holds the key)
    fd = safety.open_regular(selector.path, field="file", file=selector.display)
    with open(fd, encoding="utf-8-sig", newline="") as fh:
        yield from reader(fh, rows)


def check_selector_files(
    job: Job, *, env: Mapping[str, str] | None = None, every: bool = False
) -> dict[str, int]:
    """Read every selector file through, checking every row; rows per file (as the job names
    it). ``every`` (``bulk-tagger validate``): read past rows in error, and raise at the end
    one JobError listing, per file, the first ``MAX_LISTED`` of them and counting the rest
    (a file that cannot be read at all, or a broken header, still ends its file at once)."""
    counts: dict[str, int] = {}
    found: list[JobError] = []
    unlisted = 0
    for selector in job.file_selectors:
        rows = _Rows(job, selector, os.environ if env is None else env)
        if every:
            rows.errors = []
        try:
            counts[selector.file] = sum(1 for _ in _read_rows(rows))
        except JobError as exc:
            if not every:
                raise
            found.append(exc)
        found += rows.errors or []
        unlisted += rows.unlisted
    if found:
        first = found[0]
        first.more, first.unlisted = found[1:], unlisted
        raise first
    return counts

"""The run's exports: ``results.jsonl.gz`` (or the plain ``results.jsonl``), ``results.csv``
and ``summary.json``, written from the journal's rows (streamed: memory stays flat for any
number of rows), each file atomically.

``jsonl_line`` and ``csv_line`` give a result's JSON Lines and CSV lines (``bulk-tagger report
--format`` prints them); ``write_exports`` writes the files into a run's folder: a run writes
``results.jsonl.gz`` and ``summary.json``, ``report --export`` the plain files.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from worker.models import RESULT_FIELDS

#: Result fields that hold objects: JSON objects in results.jsonl, compact JSON text in the CSV.
_OBJECT_FIELDS = frozenset({"before", "after", "patch"})

_BUFFER = 1 << 18


def _row_values(row: Mapping[str, Any]) -> list[Any]:
    """The row's values in RESULT_FIELDS order; a missing key is None.

    ``before``/``after``/``patch`` given as JSON bytes become text: ``export_lines`` embeds
    JSON text as it is, so both exports carry objects whatever form the row had.
    """
    values = []
    for name in RESULT_FIELDS:
        value = row.get(name)
        if name in _OBJECT_FIELDS and isinstance(value, bytes):
            value = value.decode()
        values.append(value)
    return values


#: A CSV cell starting with one of these is a formula to a spreadsheet (OWASP's "CSV
#: injection"): an image name such as ``=HYPERLINK(...)`` is written ``'=HYPERLINK(...)``.
_FORMULA_START = frozenset("=+-@\t\r")
_SCALARS = frozenset({int, float, bool})
_OBJECT_INDEXES = tuple(i for i, name in enumerate(RESULT_FIELDS) if name in _OBJECT_FIELDS)


def _csv_text(text: str) -> str:
    """One CSV cell as ``csv.writer``'s excel dialect writes it (quoted when it holds a quote,
    a comma or a line break), a would-be formula neutralised first."""
    if text and text[0] in _FORMULA_START:
        text = "'" + text
    if '"' in text or "," in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def jsonl_line(row: tuple[Any, ...] | Mapping[str, Any]) -> bytes:
    """A result's ``results.jsonl`` line (UTF-8, with its line end).

    ``row``: a dict, or a tuple in RESULT_FIELDS order. ``before``/``after``/``patch`` given
    as JSON text (as the journal holds them) are embedded as they are: never decoded and
    encoded again.
    """
    values = list(row) if isinstance(row, tuple) else _row_values(row)
    for i in _OBJECT_INDEXES:
        value = values[i]
        if isinstance(value, str):
            values[i] = orjson.Fragment(value)
    return orjson.dumps(dict(zip(RESULT_FIELDS, values, strict=True)), default=str,
                        option=orjson.OPT_APPEND_NEWLINE)


def csv_line(row: tuple[Any, ...] | Mapping[str, Any]) -> str:
    """A result's ``results.csv`` line (with its line end): ``before``/``after``/``patch`` as
    compact JSON text, None an empty cell, a would-be formula led by an apostrophe."""
    values = row if isinstance(row, tuple) else _row_values(row)
    cells = []
    for value in values:
        if value is None:
            cells.append("")
        elif type(value) is str:
            cells.append(_csv_text(value))
        elif type(value) in _SCALARS:
            cells.append(str(value))
        elif isinstance(value, Mapping | list):
            cells.append(_csv_text(orjson.dumps(value, default=str).decode()))
        else:
            cells.append(str(value))
    return ",".join(cells) + "\r\n"


def export_lines(row: tuple[Any, ...] | Mapping[str, Any]) -> tuple[str, str]:
    """A result's ``results.jsonl`` line and ``results.csv`` line, each with its line end."""
    return jsonl_line(row).decode(), csv_line(row)


#: gzip level of results.jsonl.gz: level 1 keeps most of the gain (the lines repeat their
#: keys and tags) for a fraction of level 6's CPU (README: "The run's record")
GZIP_LEVEL = 1
#: The files ``write_exports`` can write, by format: the run writes the compressed results,
#: ``report --export`` the plain ones.
EXPORT_FILES = {"jsonl.gz": "results.jsonl.gz", "jsonl": "results.jsonl", "csv": "results.csv"}


class _AtomicFile:
    """A temp file in ``directory`` (mode 0600) that replaces ``target`` only on commit.

    ``file`` takes text, or bytes where ``binary``; ``gzip``: bytes, compressed on the way.
    """

    def __init__(
        self, directory: Path, target: str, *, newline: str | None = None,
        binary: bool = False, gzip_level: int | None = None,
    ) -> None:
        self.path = directory / target
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.raw: IO[bytes] | None = None
        self.file: Any  # a text file, a binary one, or a GzipFile over a binary one
        if gzip_level is not None:
            self.raw = open(fd, "wb", buffering=_BUFFER)  # noqa: SIM115 (closed in commit)
            # mtime 0 and no name: the same rows give the same bytes
            self.file = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw,
                                      compresslevel=gzip_level, mtime=0)
        elif binary:
            self.file = open(fd, "wb", buffering=_BUFFER)  # noqa: SIM115
        else:
            self.file = open(  # noqa: SIM115 (closed in commit/discard)
                fd, "w", encoding="utf-8", newline=newline, buffering=_BUFFER
            )

    def commit(self) -> None:
        if self.raw is not None:
            self.file.close()  # a GzipFile writes its trailer and leaves the raw file open
            self.file = self.raw
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o600)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # its buffer may not fit (disk full)
            self.file.close()
        if self.raw is not None:
            self.raw.close()
        self.tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_exports(
    run_dir: Path,
    results: Iterable[Mapping[str, Any] | tuple[Any, ...]],
    summary: Mapping[str, Any],
    formats: Sequence[str] = ("jsonl.gz",),
) -> int:
    """Write the results in ``formats`` (keys of EXPORT_FILES) and ``summary.json`` into
    ``run_dir``; the number of result rows written.

    ``results`` is consumed once, row by row (memory stays flat for any number of rows). Each
    row becomes one JSON object a line, keys in RESULT_FIELDS order (other keys are left out,
    missing ones are null): ``results.jsonl``, or gzip-compressed ``results.jsonl.gz`` (the
    same lines); and one CSV row with the same columns (see ``csv_line``). Each file is
    written to a temp file in ``run_dir`` and renamed into place, results first and
    ``summary.json`` last, so a reader never sees half a file and a present summary means the
    exports are complete. Files are mode 0600. On an error no temp file is left and earlier
    exports stay as they were.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files: list[_AtomicFile] = []
    rows = 0
    try:
        writers: list[Any] = []
        for fmt in formats:
            if fmt == "csv":
                csv_file = _AtomicFile(run_dir, EXPORT_FILES[fmt], newline="")
                csv_file.file.write(",".join(RESULT_FIELDS) + "\r\n")
                files.append(csv_file)
                writers.append((csv_line, csv_file.file.write))
            else:
                level = GZIP_LEVEL if fmt == "jsonl.gz" else None
                jsonl = _AtomicFile(run_dir, EXPORT_FILES[fmt], binary=True, gzip_level=level)
                files.append(jsonl)
                writers.append((jsonl_line, jsonl.file.write))
        if len(writers) == 1:  # the run's case: one format, no inner loop
            ((line, write),) = writers
            for row in results:
                write(line(row))
                rows += 1
        else:
            for row in results:
                for line, write in writers:
                    write(line(row))
                rows += 1
        summary_file = _AtomicFile(run_dir, "summary.json")
        files.append(summary_file)
        json.dump(dict(summary), summary_file.file, indent=2, ensure_ascii=False, default=str)
        summary_file.file.write("\n")
        for f in files:
            f.commit()
        files.clear()
        _fsync_dir(run_dir)
    finally:
        for f in files:
            f.discard()
    return rows

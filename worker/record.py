"""A finished run's record, read back from ``results.jsonl.gz``.

Once a run has finished (any exit code but 75: an interrupted run stays resumable), its
results are written gzip-compressed to ``results.jsonl.gz`` and its journal is compacted
(``Journal.compact``): the per-target tables are dropped, the run row stays. From then on
the targets' record is that file alone: ``report`` prints it in any format and ``undo`` reads
the updated targets' ``before`` and ``patch`` from it. Each line is the results line of
README's "The run's record", as ``report --format jsonl`` prints it. The file is read as a
stream: memory stays flat for any number of targets.
"""

from __future__ import annotations

import contextlib
import gzip
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from worker.errors import JobError
from worker.models import RESULT_FIELDS

RESULTS_GZ = "results.jsonl.gz"


def _lines(run_dir: Path) -> Iterator[dict[str, Any]]:
    path = run_dir / RESULTS_GZ
    if not path.is_file():
        raise JobError(
            f"{path} is missing: this finished run's journal holds no targets, that file did",
            file=str(path), hint="restore it from a backup of the state folder",
        )
    with gzip.open(path, "rb") as fh:
        line_no = 0
        try:
            for line_no, line in enumerate(fh, 1):  # noqa: B007 (the error names it)
                row = orjson.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                yield row
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise JobError(f"{path} is damaged: {exc}", file=str(path),
                           line=line_no + 1) from None


def compact(conn: sqlite3.Connection, run_dir: Path, exported: int) -> bool:
    """Drop the per-target tables of a finished run's journal (``conn``, its one writer)
    whose ``results.jsonl.gz`` holds ``exported`` rows, and give their space back; False (the
    journal left whole) where that is not every target's one line.

    One transaction: a kill leaves the journal whole or compacted, never half. The tables'
    pages are freed by VACUUM and the WAL truncated, so the file shrinks to a few pages; the
    run row (and the processes' counters) stay.

    ``secure_delete=FAST`` for the drop: where SQLite is built with secure delete on, the
    drop would first overwrite every freed page with zeros (about 85% of the compaction's
    CPU for 17,620 targets), pages the VACUUM then leaves out of the rebuilt file anyway."""
    (targets,) = conn.execute("SELECT COUNT(*) FROM targets").fetchone()
    if targets != exported or not (run_dir / RESULTS_GZ).is_file():
        return False
    (secure,) = conn.execute("PRAGMA secure_delete").fetchone()
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DROP TABLE outcomes")
        conn.execute("DROP TABLE targets")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute(f"PRAGMA secure_delete={int(secure)}")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return True


def iter_results(run_dir: Path, *, raw: bool = False) -> Iterator[Any]:
    """The run's results in plan order: dicts, or (``raw``) tuples in RESULT_FIELDS order."""
    for row in _lines(run_dir):
        if raw:  # map: a third of a generator's cost, paid a million times in a big report
            yield tuple(map(row.get, RESULT_FIELDS))
        else:
            yield {name: row.get(name) for name in RESULT_FIELDS}


def iter_updated(
    run_dir: Path,
) -> Iterator[tuple[int, int, str, str, dict[str, Any], dict[str, Any]]]:
    """For undo: (project, region, image, name, before, patch) of each updated target."""
    for row in _lines(run_dir):
        if row.get("status") == "updated":
            yield (int(row["project_id"]), int(row["region_id"]), str(row["image_id"]),
                   row.get("name") or "", row.get("before") or {}, row.get("patch") or {})

"""A finished run's compact record: results.jsonl.gz and the compacted journal.

A journal holding every kind of line (updated, re-read before it was sent, unchanged, skipped
at plan time, failed, a target named twice) is exported as the runner does, finished and
compacted. Everything read afterwards, ``report --format jsonl|csv`` through the CLI and
undo's list of updated targets, equals what the whole journal gave before: the lines of the
results.jsonl this worker wrote before the record was compacted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.test_journal import add_target, new_journal, outcome, plan_before
from worker import exports
from worker.cli import cli
from worker.journal import Journal


async def whole_journal(run_dir: Path) -> Journal:
    journal = new_journal(run_dir)
    for i in range(1, 7):
        add_target(journal, i)
    add_target(journal, 7, status="skipped", reason="read_only")
    add_target(journal, 8, status="unchanged", reason="unchanged")
    add_target(journal, 2)  # named twice
    await journal.flush()
    items = {p.seq: p for p in journal.iter_pending()}
    journal.add_outcome(1, outcome(before=items[1].before, patch=items[1].patch,
                                   after={"tags": {"owner": "t"}, "ssh_key": "allow"}))
    later = {"tags": {"team": "t", "lock": "done"}, "ssh_key": "deny"}
    journal.add_outcome(2, outcome(before=later, patch={"tags": {"team": None, "owner": "t"}},
                                   lock_wait_s=1.5, attempts=3, duration_ms=1520))
    journal.add_outcome(3, outcome(status="unchanged", reason="unchanged",
                                   before={"tags": {"owner": "t"}}, patch=None))
    journal.add_outcome(4, outcome(status="failed", reason="rejected", http_status=422,
                                   error='{"message": "bad, \\"quoted\\"\\nline"}'))
    journal.add_outcome(5, outcome(before=items[5].before, patch=items[5].patch,
                                   after={"tags": {"é": "ü"}}))
    journal.add_outcome(6, outcome(status="failed", reason="unreachable", http_status=None))
    await journal.flush()
    return journal


def files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def cli_out(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


async def test_the_compacted_record_reads_as_the_whole_journal(tmp_path: Path) -> None:
    run_dir = tmp_path / "state" / "r"
    journal = await whole_journal(run_dir)
    before_rows = list(journal.iter_results("r"))
    before_updated = list(journal.iter_updated())
    # what results.jsonl held before this record was compacted: the same rows, plain
    plain = b"".join(exports.jsonl_line(row) for row in journal.iter_results("r", raw=True))
    assert len(before_rows) == 8 and {r["status"] for r in before_rows} == {
        "updated", "unchanged", "skipped", "failed"}

    rows = exports.write_exports(run_dir, journal.iter_results("r", raw=True),
                                {"run_id": "r", "counts": journal.counts()})
    assert rows == 8
    assert gzip.decompress((run_dir / "results.jsonl.gz").read_bytes()) == plain
    journal.finish_run(1, {"run_id": "r", "counts": journal.counts()})
    assert not journal.compact(rows - 1)  # a record short of a line: the journal stays whole
    assert not journal.compacted
    assert journal.compact(rows)
    assert journal.compacted
    journal.close()
    # the run row's pages alone, no WAL left
    assert set(files(run_dir)) == {"journal.sqlite", "results.jsonl.gz", "summary.json"}
    assert journal.path.stat().st_size <= 2 * 4096
    tables = sqlite3.connect(journal.path).execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert "run" in {name for (name,) in tables}
    assert not {"targets", "outcomes"} & {name for (name,) in tables}

    reopened = Journal(run_dir)
    assert reopened.compacted
    assert list(reopened.iter_results("r")) == before_rows
    assert list(reopened.iter_updated()) == before_updated
    assert before_updated[0][4] == plan_before(1)
    assert reopened.counts() == {"updated": 3, "unchanged": 2, "skipped": 1, "failed": 2}
    reopened.close()

    state = str(tmp_path / "state")
    printed = cli_out("report", "r", "--state-dir", state, "--format", "jsonl")
    assert printed.encode() == plain
    assert [json.loads(line) for line in printed.splitlines()] == before_rows
    table = list(csv.DictReader(io.StringIO(
        cli_out("report", "r", "--state-dir", state, "--format", "csv"), newline="")))
    assert [r["image_id"] for r in table] == [r["image_id"] for r in before_rows]
    assert [json.loads(r["before"]) for r in table] == [r["before"] for r in before_rows]
    assert table[3]["error"] == before_rows[3]["error"]

    cli_out("report", "r", "--state-dir", state, "--export")
    assert (run_dir / "results.jsonl").read_bytes() == plain
    with (run_dir / "results.csv").open(newline="", encoding="utf-8") as fh:
        exported: list[dict[str, Any]] = list(csv.DictReader(fh))
    assert exported == table


def test_a_missing_record_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "state" / "r"
    journal = new_journal(run_dir)
    add_target(journal, 1, status="skipped", reason="read_only")
    journal.flush_sync()
    rows = exports.write_exports(run_dir, journal.iter_results("r", raw=True), {"run_id": "r"})
    journal.finish_run(0, {"run_id": "r", "counts": {"skipped": 1}})
    assert journal.compact(rows)
    journal.close()
    (run_dir / "results.jsonl.gz").unlink()
    result = CliRunner().invoke(cli, ["report", "r", "--state-dir", str(tmp_path / "state"),
                                      "--format", "jsonl"])
    assert result.exit_code != 0
    assert "results.jsonl.gz is missing" in str(result.exception)

"""The end of a run: its record written for good, and what a person reads of it.

``write_record`` writes the exports (results.jsonl.gz, summary.json) from the journal, then
marks the run finished in it: a kill while the exports are written leaves the run resumable,
and the resume writes them. A run that ended for good (not interrupted: exit code other than
75) then has its journal compacted: results.jsonl.gz is its targets' record from then on.
``end_text`` is what the command prints: a plan's changes (for ``plan`` and previews), why
the run stopped, the summary and where its record is, control characters escaped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from worker import exports, nextstep, report, safety
from worker.errors import ApiError, BulkTaggerError, ExitCode
from worker.journal import Journal, now_iso, read_run_info
from worker.log import scrub
from worker.planrun import Recorder


async def write_record(
    journal: Journal, *, run_id: str, code: int, summary: Mapping[str, Any],
    finished_at: datetime,
) -> None:
    """The exports written, the run row finished (``code``, ``summary``), the journal
    compacted when the run ended for good, and closed."""
    run_dir = journal.run_dir
    rows = await asyncio.to_thread(
        exports.write_exports, run_dir, journal.iter_results(run_id, raw=True), summary
    )
    for stale in ("results.jsonl", "results.csv"):  # an earlier `report --export`'s
        (run_dir / stale).unlink(missing_ok=True)
    # finished only once the exports exist: a kill while writing them leaves the run
    # resumable, and the resume writes them
    journal.finish_run(code, summary, now_iso(finished_at))
    if code != ExitCode.INTERRUPTED:
        # finished for good: results.jsonl.gz is the targets' record from now on
        await asyncio.to_thread(journal.compact, rows)
    journal.close()


def end_text(
    summary: Mapping[str, Any], *, journal: Journal, run_id: str, kind: str,
    counts: Mapping[str, int], plan: Recorder | None, fatal: BaseException | None,
) -> str:
    """What the command prints at its end (``plan``: the recorder of a run that only
    planned, whose changes are shown)."""
    text: list[str] = []  # for a person: control characters (names, tags) escaped
    if plan is not None:
        # counts from the journal: a target named twice is planned once
        text.append(report.format_plan(
            counts, plan.reasons, plan.samples,
            max(0, counts.get("planned", 0) - len(plan.samples)), plan.keys.lines(),
        ))
    if isinstance(fatal, BulkTaggerError) and not isinstance(fatal, ApiError):
        text.append(f"stopped: {scrub(str(fatal))}")
    # the commands it names are in the run's state dir
    seen = nextstep.Seen.of(read_run_info(journal.run_dir), journal.run_dir)
    text += [report.format_summary(summary, targets=kind != "plan", seen=seen),
             f"report: {journal.run_dir}",
             "  results.jsonl.gz and summary.json there; "
             f"`{seen.command('report', run_id)} --format jsonl|csv|json` prints them"]
    return "".join(safety.printable(line, newlines=True) + "\n" for line in text)

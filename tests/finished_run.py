"""A finished run's folder written without running it: a million targets in seconds, for the
html report's caps (tests/test_html_report.py) and its cost at scale (bench scenario v).

The folder is what a finished run leaves (README, "The run's record"): ``results.jsonl.gz``
and ``summary.json`` written by ``exports.write_exports``, and a compacted ``journal.sqlite``
made by ``Journal`` (its run row, finished) with one row a second in its ``seconds`` table
(worker.timeline). The journal never held the targets (nothing was planned through it), so
it is compacted with ``compact(0)``: its zero targets, the record's lines in the gzip alone.

The mix: ``failed`` targets spread over ``FAILURES`` (reason, HTTP status, message), a
lock timeout's message naming its task (every message different); ``skipped`` over the two
plan-time reasons; ``unchanged``; the rest ``updated`` by a job that sets one tag, removes
one and renames another, as a nightly retag does. Names and ids are made of the index.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker import exports, timeline
from worker.journal import Journal
from worker.report import LatencyStats, build_summary

#: (reason, HTTP status, error text; ``{i}`` is the target's index) of the failures, in turn
FAILURES: tuple[tuple[str, int | None, str], ...] = (
    ("rejected", 403, '{"message": "public images cannot be modified"}'),
    ("not_found", 404, '{"message": "image not found"}'),
    ("lock_timeout", 409, "the image's task 7d1c{i}-0000-4000-8000-000000000000 held its "
                          "lock past lock_timeout_seconds"),
    ("server_error", 500, "HTTP 500 after 6 attempts"),
    ("unreachable", None, "no answer within the retry budget"),
)
SKIPS = ("read_only", "rename_conflict")
T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def _step(targets: int) -> int:
    """A step near ``targets`` / the golden ratio, coprime to it: target i takes slot
    i * step mod targets (a permutation), so each status is spread evenly through the run."""
    step = max(1, round(targets * 0.6180339887))
    while math.gcd(step, targets) != 1:
        step += 1
    return step


def _rows(run_id: str, targets: int, failed: int, skipped: int,
          unchanged: int) -> Iterator[tuple[Any, ...]]:
    """The results in RESULT_FIELDS order: the targets whose slot is below ``failed`` fail
    (the slot picks the failure), the next ``skipped`` slots are skipped, and so on."""
    step = _step(targets)
    for i in range(targets):
        slot = i * step % targets
        image_id = f"{i:08x}-5c1e-4d2a-9b7f-{i * 7919 % 10**12:012d}"
        name = f"img-{i:07d}-ubuntu-22.04"
        team = f"team-{i % 40}"
        before = {"tags": {"team": team, "legacy": "yes", "env": "prod"}, "ssh_key": "allow"}
        if slot < failed:
            reason, http, error = FAILURES[slot % len(FAILURES)]
            yield (run_id, 1337, 7, image_id, name, "failed", reason, before, None, None, 6,
                   http, 0.0, 1200, error.replace("{i}", f"{i:08x}"))
        elif slot < failed + skipped:
            yield (run_id, 1337, 7, image_id, name, "skipped", SKIPS[slot % len(SKIPS)],
                   before, None, None, 0, None, 0.0, 0,
                   "the image is public: its tags are read-only")
        elif slot < failed + skipped + unchanged:
            yield (run_id, 1337, 7, image_id, name, "unchanged", "unchanged", before, None,
                   None, 0, None, 0.0, 0, None)
        else:
            patch = {"tags": {"managed-by": "bulk-tagger", "legacy": None, "team": None,
                              "owner": team}}
            after = {"tags": {"managed-by": "bulk-tagger", "owner": team, "env": "prod"},
                     "ssh_key": "allow"}
            yield (run_id, 1337, 7, image_id, name, "updated", None, before, after, patch, 1,
                   200, 0.0, 41, None)


def write(state_dir: Path, run_id: str, targets: int, *, failed: int = 0, skipped: int = 0,
          unchanged: int = 0, seconds: int = 0) -> Path:
    """A finished, compacted run of ``targets`` targets (``failed``, ``skipped`` and
    ``unchanged`` of them so, the rest updated) and ``seconds`` seconds of time line; its
    folder."""
    run_dir = state_dir / run_id
    counts = {"updated": targets - failed - skipped - unchanged, "unchanged": unchanged,
              "skipped": skipped, "failed": failed}
    reasons: dict[str, dict[str, int]] = {"failed": {}, "skipped": {}}
    for slot in range(failed):
        reason = FAILURES[slot % len(FAILURES)][0]
        reasons["failed"][reason] = reasons["failed"].get(reason, 0) + 1
    for slot in range(failed, failed + skipped):
        reason = SKIPS[slot % len(SKIPS)]
        reasons["skipped"][reason] = reasons["skipped"].get(reason, 0) + 1
    latency = LatencyStats()
    latency.add(41.0)
    duration = max(seconds, 1)
    summary = build_summary(
        run_id=run_id, job="nightly", started_at=T0,
        finished_at=T0 + timedelta(seconds=duration), exit_code=1 if failed else 0,
        counts=counts, requests={"list": targets // 1000 + 1, "patch": counts["updated"]},
        latency=latency, extra={"kind": "run", "reasons": reasons})
    journal = Journal(run_dir)
    try:
        journal.create_run(run_id=run_id, kind="run", job_name="nightly", job_path=None,
                           job_hash="x", options={"rate_ceiling": None},
                           started_at=summary["started_at"])
        written = exports.write_exports(run_dir, _rows(run_id, targets, failed, skipped,
                                                       unchanged), summary)
        assert written == targets
        journal.finish_run(summary["exit_code"], summary, finished_at=summary["finished_at"])
        assert journal.compact(0)  # the journal held no target: the gzip holds them all
    finally:
        journal.close()
    if seconds:
        start = int(T0.timestamp())
        per = max(1, targets // seconds)
        conn = sqlite3.connect(run_dir / "journal.sqlite")
        with conn:
            conn.execute(timeline.SCHEMA)
            timeline.write(conn, [(start + s, per, s % 97 == 0, 0, s % 89 == 0, 0, 250.0)
                                  for s in range(seconds)])
        conn.close()
    return run_dir

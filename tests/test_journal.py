"""The journal on its own: batching, WAL, file modes, pending/results streams, finding runs.

Real SQLite files under tmp_path; what a commit did is always checked through a separate
connection (as another process would see it), never through the journal's own.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from worker import log, safety
from worker.errors import JobError
from worker.journal import (
    Journal,
    JournalFailed,
    read_run_info,
)
from worker.models import Changes, Outcome, changes_from_json, changes_to_json
from worker.retention import find_resumable

CHANGES = Changes(set_tags={"managed-by": "bulk-tagger"}, remove_tags=("legacy",),
                  rename_tags={"team": "owner"}, set_fields={"ssh_key": "allow"})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def committed(journal: Journal) -> int:
    return int(query(journal.path, "SELECT COUNT(*) FROM outcomes")[0][0])


def new_journal(run_dir: Path, **kw: Any) -> Journal:
    journal = Journal(run_dir, **kw)
    journal.create_run(run_id=run_dir.name, kind="run", job_name="job", job_path=None,
                       job_hash="h1", options={"concurrency": 4})
    return journal


def plan_before(i: int) -> dict[str, Any]:
    return {"tags": {"team": "t", "legacy": "x"}, "ssh_key": "deny", "name": f"img-{i}"}


def add_target(journal: Journal, i: int, *, status: str = "planned",
               reason: str | None = None, image_id: str | None = None) -> None:
    before = plan_before(i)
    patch = ({"tags": {"team": None, "owner": "t", "legacy": None, "managed-by": "bulk-tagger"},
              "ssh_key": "allow"} if status == "planned" else None)
    journal.add_target(
        project_id=1, region_id=7, image_id=image_id or f"img-{i:04d}", name=f"img-{i}",
        source="query 1", changes=CHANGES, before=before, patch=patch, lock_task=None,
        plan_status=status, plan_reason=reason,
        plan_detail=None if status == "planned" else f"detail {i}",
    )


def outcome(status: str = "updated", **kw: Any) -> Outcome:
    fields: dict[str, Any] = {"project_id": 1, "region_id": 7, "image_id": "x", "name": "x",
                              "status": status, "attempts": 1, "http_status": 200}
    fields.update(kw)
    return Outcome(**fields)


async def wait_for(predicate: Any, limit_s: float = 10.0) -> float:
    """Poll ``predicate`` until true; returns the seconds it took (fails after ``limit_s``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit_s:
            pytest.fail(f"not true within {limit_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
def umask0() -> Iterator[None]:
    """The loosest umask: whatever is private must be made so by the code, not the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- files ------------------------------------------------------------------------------------
async def test_file_modes_are_private_whatever_the_umask(tmp_path: Path, umask0: None) -> None:
    state = tmp_path / "state"
    safety.state_dir(state)
    journal = new_journal(state / "run-1")
    add_target(journal, 1)
    await journal.flush()
    try:
        assert mode(state) == 0o700
        assert mode(journal.run_dir) == 0o700
        assert mode(journal.path) == 0o600
        wal = journal.path.with_name("journal.sqlite-wal")
        shm = journal.path.with_name("journal.sqlite-shm")
        assert wal.exists() and shm.exists(), "WAL mode keeps a -wal and a -shm file"
        assert mode(wal) == 0o600
        assert mode(shm) == 0o600
    finally:
        journal.close()


def test_an_existing_state_dir_keeps_its_mode(tmp_path: Path) -> None:
    state = tmp_path / "volume-root"
    state.mkdir()
    os.chmod(state, 0o2775)  # what Kubernetes' fsGroup leaves on a volume's root
    safety.state_dir(state)
    assert mode(state) == 0o2775
    journal = Journal(state / "run-1")
    journal.close()
    assert mode(state / "run-1") == 0o700


def test_a_state_dir_that_is_a_file_is_a_job_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(JobError, match="not a directory"):
        safety.state_dir(path)


async def test_journal_is_in_wal_mode_and_readable_while_open(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r")
    try:
        assert query(journal.path, "PRAGMA journal_mode") == [("wal",)]
        add_target(journal, 1)
        await journal.flush()
        # a reader (report, resume's lookup) sees the commit while the writer is open
        assert read_run_info(journal.run_dir)["run_id"] == "r"
        assert query(journal.path, "SELECT image_id FROM targets") == [("img-0001",)]
    finally:
        journal.close()


# -- batching ---------------------------------------------------------------------------------
async def test_a_full_batch_is_committed_without_waiting_for_the_interval(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r", batch=5, flush_s=3600)
    for i in range(12):
        add_target(journal, i)
    await journal.flush()
    journal.start_writer()
    try:
        for seq in range(1, 5):
            journal.add_outcome(seq, outcome())
        await asyncio.sleep(0.2)  # the writer had every chance: 4 < batch, interval an hour
        assert committed(journal) == 0
        journal.add_outcome(5, outcome())
        await wait_for(lambda: committed(journal) == 5)
        for seq in range(6, 9):
            journal.add_outcome(seq, outcome())
        await asyncio.sleep(0.2)
        assert committed(journal) == 5
    finally:
        await journal.stop_writer()  # commits the rest
        assert committed(journal) == 8
        journal.close()


def test_changes_keep_their_literal_flag_through_the_journal() -> None:
    """Undo's values come back from the journal (resume, a lock's re-plan) still literal."""
    literal = Changes.from_patch({"tags": {"v": "{image.name}", "gone": None}, "name": "a{b}"})
    assert literal.literal
    back = changes_from_json(changes_to_json(literal))
    assert back == literal and back.literal
    assert not changes_from_json(changes_to_json(CHANGES)).literal
    assert "literal" not in changes_to_json(CHANGES)


def test_add_outcome_does_no_io(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r", batch=1)
    add_target(journal, 1)
    journal.flush_sync()
    journal.add_outcome(1, outcome())  # batch is full, but nothing runs without the writer
    assert committed(journal) == 0
    journal.close()  # close commits
    assert query(journal.path, "SELECT seq, status FROM outcomes") == [(1, "updated")]


@pytest.mark.timing
async def test_a_partial_batch_is_committed_within_the_interval(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r", batch=500, flush_s=0.2)
    add_target(journal, 1)
    add_target(journal, 2)
    await journal.flush()
    journal.start_writer()
    try:
        await asyncio.sleep(0.3)  # the writer is between two ticks, whichever
        journal.add_outcome(1, outcome())
        took = await wait_for(lambda: committed(journal) == 1, limit_s=5.0)
        assert took <= 0.2 + 0.8, f"committed after {took:.2f} s; flush_s is 0.2 s"
    finally:
        await journal.stop_writer()
        journal.close()


async def test_a_cancelled_flush_still_commits_and_never_overlaps_the_next(
    tmp_path: Path,
) -> None:
    journal = new_journal(tmp_path / "r", batch=100_000, flush_s=3600)
    for i in range(3000):
        add_target(journal, i)
    await journal.flush()
    for round_ in range(5):
        for seq in range(1, 3001):
            journal.add_outcome(seq, outcome(duration_ms=round_))
        task = asyncio.create_task(journal.flush())
        await asyncio.sleep(0)  # the commit thread has started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the next commit comes while the cancelled one may still be running in its thread
        journal.add_outcome(1, outcome(status="failed", duration_ms=round_))
        await journal.flush()
    journal.close()
    assert committed(journal) == 3000
    assert query(journal.path, "SELECT status, duration_ms FROM outcomes WHERE seq = 1") == [
        ("failed", 4)
    ]


async def test_a_failed_commit_stops_the_run(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r")
    add_target(journal, 1)
    add_target(journal, 2)
    await journal.flush()
    # someone damages the file under the run (here: drops a table from another connection)
    query(journal.path, "DROP TABLE outcomes")
    journal.add_outcome(1, outcome())
    with pytest.raises(JournalFailed, match="no such table"):
        await journal.flush()
    with pytest.raises(JournalFailed):
        journal.add_outcome(2, outcome())  # the pool stops instead of sending unrecorded work
    assert JournalFailed.exit_code == 75
    journal.close()


# -- what comes back out ----------------------------------------------------------------------
async def test_iter_pending_is_plan_order_without_ended_or_planned_away_targets(
    tmp_path: Path,
) -> None:
    journal = new_journal(tmp_path / "r")
    for i in range(1, 11):
        add_target(journal, i)
    add_target(journal, 11, status="skipped", reason="read_only")
    add_target(journal, 12, status="unchanged", reason="unchanged")
    add_target(journal, 3, status="skipped", reason="read_only")  # staged twice: first kept
    add_target(journal, 13, status="failed", reason="not_found")
    await journal.flush()
    journal.add_outcome(2, outcome())
    journal.add_outcome(5, outcome(status="failed", reason="rejected"))
    await journal.flush()
    journal.add_outcome(7, outcome())  # buffered, not committed: still pending on disk

    pending = list(journal.iter_pending(chunk=2))
    assert [p.seq for p in pending] == [1, 3, 4, 6, 7, 8, 9, 10]
    assert [p.image_id for p in pending][:2] == ["img-0001", "img-0003"]
    first = pending[0]
    assert first.changes == CHANGES
    assert first.patch is not None and first.patch["ssh_key"] == "allow"
    assert first.before is None, "the plan-time state stays in the journal"
    journal.close()


async def test_an_undo_target_carries_what_the_image_must_still_show(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r")
    run_patch = {"tags": {"managed-by": "bulk-tagger", "legacy": None}, "ssh_key": "allow"}
    journal.add_target(
        project_id=1, region_id=7, image_id="a", name="a", source="undo", changes=CHANGES,
        before={"tags": {"managed-by": "bulk-tagger"}}, patch={"tags": {"managed-by": None}},
        lock_task=None, plan_status="planned", plan_reason=None, plan_detail=None,
        expect=run_patch,
    )
    add_target(journal, 2)
    await journal.flush()
    undo_target, run_target = journal.iter_pending()
    assert undo_target.expect == run_patch
    assert run_target.expect is None
    journal.close()


async def test_iter_results_has_one_row_per_target_in_plan_order(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r")
    for i in range(1, 6):
        add_target(journal, i)
    add_target(journal, 6, status="skipped", reason="read_only")
    add_target(journal, 2)  # named twice
    await journal.flush()
    items = {p.seq: p for p in journal.iter_pending()}
    item = items[1]
    journal.add_outcome(1, outcome(before=item.before, patch=item.patch,
                                   after={"tags": {"owner": "t"}}))
    journal.add_outcome(2, outcome(status="failed", reason="unreachable", http_status=503))
    journal.add_outcome(2, outcome(status="updated"))  # a later outcome replaces it
    reread = {"tags": {"owner": "t", "managed-by": "bulk-tagger"}, "ssh_key": "allow"}
    journal.add_outcome(3, outcome(status="unchanged", reason="unchanged", before=reread,
                                   patch=None, http_status=None))
    await journal.flush()

    rows = list(journal.iter_results("r", chunk=2))
    assert [r["image_id"] for r in rows] == [f"img-{i:04d}" for i in range(1, 7)]
    assert [r["status"] for r in rows] == [
        "updated", "updated", "unchanged", "planned", "planned", "skipped"]
    assert all(r["run_id"] == "r" for r in rows)
    one, _, three, four, _, six = rows
    assert one["before"] == plan_before(1) and one["patch"] == item.patch
    assert one["after"] == {"tags": {"owner": "t"}}
    # a target re-read before it was sent shows the state it was read in, and no patch
    assert three["before"] == reread and three["patch"] is None
    # a pending target shows what the plan would send
    assert four["patch"] == items[4].patch and four["error"] is None
    assert six["reason"] == "read_only" and six["error"] == "detail 6"
    assert six["patch"] is None
    assert journal.counts() == {"updated": 2, "unchanged": 1, "planned": 2, "skipped": 1}
    assert journal.plan_counts() == (5, 6)
    journal.close()


async def test_outcomes_reuse_the_stored_text_of_what_was_handed_out(tmp_path: Path) -> None:
    journal = new_journal(tmp_path / "r")
    add_target(journal, 1)
    add_target(journal, 2)
    await journal.flush()
    one, two = journal.iter_pending()
    journal.add_outcome(one.seq, outcome(before=one.before, patch=one.patch))
    new_patch = {"tags": {"managed-by": "bulk-tagger"}}
    journal.add_outcome(two.seq, outcome(before={"tags": {}}, patch=new_patch))
    journal.close()
    rows = query(journal.path, "SELECT o.before IS NULL, t.patch = o.patch, o.patch"
                 " FROM targets t JOIN outcomes o USING (seq) ORDER BY seq")
    # the state the plan read is not written twice: the outcome's before stays NULL
    assert rows[0] == (1, 1, rows[0][2])
    assert rows[1] == (0, 0, '{"tags":{"managed-by":"bulk-tagger"}}')


async def test_iter_updated_pairs_the_patch_with_the_state_it_was_made_for(
    tmp_path: Path,
) -> None:
    journal = new_journal(tmp_path / "r")
    for i in range(1, 4):
        add_target(journal, i)
    await journal.flush()
    items = list(journal.iter_pending())
    journal.add_outcome(1, outcome(before=items[0].before, patch=items[0].patch))
    later = {"tags": {"team": "t", "lock": "done"}, "ssh_key": "deny"}
    later_patch = {"tags": {"team": None, "owner": "t"}}
    journal.add_outcome(2, outcome(before=later, patch=later_patch))  # re-planned after a lock
    journal.add_outcome(3, outcome(status="failed", reason="rejected"))
    await journal.flush()
    updated = list(journal.iter_updated(chunk=1))
    assert [(u[2], u[4], u[5]) for u in updated] == [
        ("img-0001", plan_before(1), items[0].patch),
        ("img-0002", later, later_patch),
    ]
    journal.close()


async def test_no_secret_reaches_the_file(tmp_path: Path) -> None:
    canary = "canary-KEY-7f3a9c1d2e-journal"
    log.redact(canary)
    journal = new_journal(tmp_path / "r")
    journal.add_target(
        project_id=1, region_id=7, image_id="a", name="a", source="q", changes=CHANGES,
        before={"tags": {}}, patch=None, lock_task=None, plan_status="failed",
        plan_reason="template", plan_detail=f"echoed {canary}",
    )
    add_target(journal, 2)
    await journal.flush()
    journal.add_outcome(2, outcome(status="failed", error=f"401: bad key {canary}"))
    journal.finish_run(1, {"error": f"APIKey {canary}"})
    journal.close()
    data = b"".join(p.read_bytes() for p in journal.run_dir.iterdir())
    assert canary.encode() not in data
    assert b"***" in data


# -- finding runs -----------------------------------------------------------------------------
def make_run(state: Path, run_id: str, *, kind: str = "run", job: str = "nightly",
             job_hash: str = "h1", shard: str | None = None, exit_code: int | None = None,
             age: timedelta = timedelta(minutes=5)) -> None:
    journal = Journal(state / run_id)
    journal.create_run(run_id=run_id, kind=kind, job_name=job, job_path=None,
                       job_hash=job_hash, options={}, shard=shard)
    if exit_code is not None:
        journal.finish_run(exit_code, {})
    journal.close()
    started = (datetime.now(UTC) - age).isoformat(timespec="milliseconds")
    query(journal.path, "UPDATE run SET started_at = ?", started.replace("+00:00", "Z"))


def find(state: Path, *, kind: str = "run", job: str = "nightly", job_hash: str = "h1",
         shard: str | None = None, within: timedelta = timedelta(hours=24)) -> str | None:
    return find_resumable(state, job_name=job, job_hash=job_hash, kind=kind, shard=shard,
                          within=within)


def test_find_resumable_takes_only_unfinished_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert find(state) is None  # no state dir yet
    for code in (0, 1, 2, 3, 4, 70):
        make_run(state, f"done-{code}", exit_code=code, age=timedelta(minutes=1))
    assert find(state) is None
    make_run(state, "killed", exit_code=None, age=timedelta(minutes=30))
    assert find(state) == "killed"
    make_run(state, "interrupted", exit_code=75, age=timedelta(minutes=20))
    assert find(state) == "interrupted"  # the latest unfinished one


def test_find_resumable_matches_kind_job_and_shard(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_run(state, "other-job", job="weekly")
    make_run(state, "a-plan", kind="plan")
    make_run(state, "shard-1", shard="1/2")
    assert find(state) is None
    assert find(state, job="weekly") == "other-job"
    assert find(state, shard="1/2") == "shard-1"
    assert find(state, shard="0/2") is None
    make_run(state, "whole", age=timedelta(minutes=10))
    assert find(state) == "whole"


def test_find_resumable_looks_back_only_within_the_window(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_run(state, "old", age=timedelta(hours=30))
    assert find(state) is None
    assert find(state, within=timedelta(hours=48)) == "old"
    make_run(state, "recent", age=timedelta(minutes=50))
    assert find(state, within=timedelta(hours=1)) == "recent"
    assert find(state, within=timedelta(minutes=10)) is None


def test_find_resumable_refuses_a_run_of_another_job_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_run(state, "made-from-v1", job_hash="v1")
    with pytest.raises(JobError) as caught:
        find(state, job_hash="v2")
    message = str(caught.value)
    assert "made-from-v1" in message and "--resume" in message
    assert "another version of this job file" in message
    # finished runs of another version do not stand in the way
    make_run(state, "finished-v1", job_hash="v1", exit_code=0, age=timedelta(minutes=1))
    with pytest.raises(JobError):
        find(state, job_hash="v2")


def test_find_resumable_for_undo_takes_only_undos_of_that_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_run(state, "undo-of-a", kind="undo", job_hash="run-a", age=timedelta(minutes=10))
    make_run(state, "undo-of-b", kind="undo", job_hash="run-b", age=timedelta(minutes=1))
    assert find(state, kind="undo", job_hash="run-a") == "undo-of-a"
    assert find(state, kind="undo", job_hash="run-c") is None
    assert find(state, kind="run") is None


def test_find_resumable_skips_what_is_not_a_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_run(state, "good")
    (state / "a-file").write_text("x")
    (state / "empty-dir").mkdir()
    (state / "corrupt").mkdir()
    (state / "corrupt" / "journal.sqlite").write_bytes(b"not a database at all" * 100)
    (state / "no-run-row").mkdir()
    Journal(state / "no-run-row").close()  # killed between creating the file and the row
    assert find(state) == "good"
    assert read_run_info(state / "corrupt") == {}
    assert read_run_info(state / "no-run-row") == {}


def test_read_run_info_survives_odd_paths(tmp_path: Path) -> None:
    state = tmp_path / "a dir?with#odd%20chars"
    make_run(state, "r1")
    info = read_run_info(state / "r1")
    assert info["run_id"] == "r1" and info["exit_code"] is None and info["kind"] == "run"

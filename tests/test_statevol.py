"""A full or unwritable state volume (README: exit codes, 74), with the real CLI on a real small
file system: a tmpfs mounted for the test (root may mount one; elsewhere these tests skip).

- A run that fills the volume mid-apply stops with the plain message (no SQLite error, no
  traceback) and exit 74; after the volume grows, ``--resume`` finishes the run with one
  record per target and the simulator ends as the job says.
- A new run of the same job on a volume it clearly cannot fit is refused before planning:
  exit 74, nothing sent, no run folder made. The measured bytes per target stay under
  ``DEFAULT_BYTES_PER_TARGET``.
- A read-only volume: "cannot write DIR: permission denied", exit 74, nothing sent.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import test_resume
from tests.helpers import images, results, summary, write_job
from tests.test_resume import (
    JOB,
    expected,
    run_args,
    run_cli,
    targeted,
)
from worker.exports import write_exports
from worker.journal import Journal
from worker.models import Changes
from worker.simulator import SimulatorThread
from worker.statevol import DEFAULT_BYTES_PER_TARGET, folder_bytes, free_bytes

fresh_sim = test_resume.fresh_sim  # the fixture, shared

EXIT_STATE_VOLUME = 74


def _mount(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(size, ro=False)``: a fresh tmpfs of ``size`` (e.g. "600k"); ``.remount``."""
    mounted: list[Path] = []

    def mount(size: str, *, ro: bool = False) -> Path:
        point = tmp_path / f"vol{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if ro else "")
        done = _mount(["-t", "tmpfs", "-o", options, "tmpfs", str(point)])
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, size: str) -> None:
    done = _mount(["-o", f"remount,size={size}", str(point)])
    assert done.returncode == 0, done.stderr


def test_a_full_volume_stops_plainly_and_resume_finishes_once_space_is_freed(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread], tmpfs: Callable[..., Path]
) -> None:
    sim = fresh_sim(images=2000)
    initial = images(sim)
    targets = {k for k, image in initial.items() if targeted(image)}
    job = write_job(tmp_path, JOB)
    volume = tmpfs("600k")  # the plan's ~700 targets fit; their outcomes do not
    state = volume / "state"

    first = run_cli(tmp_path, "first", *run_args(job, sim, state))
    err = first.err.read_text()
    assert first.proc.returncode == EXIT_STATE_VOLUME, first.text()
    assert f"error: the state volume {state} is full (" in err and " bytes free)" in err, err
    for noise in ("Traceback", "rollback", "sqlite", "database", "internal error"):
        assert noise not in err, err
    sent = sim.call(lambda: sim.sim.counters.requests["patch"])
    assert sent > 0, "it stopped while applying"

    remount(volume, "16m")
    second = run_cli(tmp_path, "second", *run_args(job, sim, state, "--resume"))
    assert second.proc.returncode == 0, second.text()
    (run_dir,) = [p for p in state.iterdir() if p.is_dir()]
    rows = results(run_dir)
    keys = [(r["project_id"], r["region_id"], r["image_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(targets) and set(keys) == targets
    assert {r["status"] for r in rows} == {"updated"}
    assert summary(run_dir)["counts"]["planned"] == 0
    final = images(sim)
    assert all(final[k] == expected(initial[k]) for k in initial)
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    # what the run took per target at its largest (its record is compacted since): the
    # figure a run without an earlier one assumes
    per_target = summary(run_dir)["record_bytes_peak"] / len(targets)
    assert 1000 < per_target <= DEFAULT_BYTES_PER_TARGET, per_target
    assert folder_bytes(run_dir) / len(targets) < 300  # compacted

    # the next run of this job clearly cannot fit in what is left: refused, nothing sent
    used = folder_bytes(run_dir)
    remount(volume, f"{(used >> 10) + 300}k")
    before = sim.call(sim.sim.counters.total)
    third = run_cli(tmp_path, "third", *run_args(job, sim, state))
    err = third.err.read_text()
    assert third.proc.returncode == EXIT_STATE_VOLUME, third.text()
    assert f"the state volume {state} is full for this run" in err
    assert f"a run of {len(targets)} targets needs about" in err and "nothing was sent" in err, err
    assert sim.call(sim.sim.counters.total) == before
    assert [p for p in state.iterdir() if p.is_dir()] == [run_dir], "no folder made"


def test_a_read_only_volume_is_named_plainly(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread], tmpfs: Callable[..., Path]
) -> None:
    sim = fresh_sim(images=200)
    job = write_job(tmp_path, JOB)
    volume = tmpfs("1m", ro=True)
    refused = run_cli(tmp_path, "refused", *run_args(job, sim, volume / "state"))
    err = refused.err.read_text()
    assert refused.proc.returncode == EXIT_STATE_VOLUME, refused.text()
    assert f"error: cannot write {volume / 'state'}: permission denied" in err, err
    assert "Traceback" not in err
    assert sim.call(sim.sim.counters.total) == 0


def test_a_full_volume_leaves_a_finished_journal_whole_instead_of_compacting_it(
    tmpfs: Callable[..., Path]
) -> None:
    """Compaction needs room (the dropped tables' pages go through the WAL): without it the
    journal stays whole, readable, and no "cannot rollback" error stands for the full disk."""
    run_dir = tmpfs("2m") / "state" / "r1"
    journal = Journal(run_dir)
    journal.create_run(run_id="r1", kind="run", job_name="full", job_path=None, job_hash="h",
                       options={})
    for i in range(400):
        journal.add_target(project_id=1, region_id=2, image_id=f"img-{i:04d}", name="n" * 200,
                           source="test", changes=Changes(set_tags={"k": "v"}),
                           before={"tags": {"a": "b" * 300}}, patch={"tags": {"k": "v"}},
                           lock_task=None, plan_status="unchanged", plan_reason="unchanged",
                           plan_detail=None)
    journal.flush_sync()
    rows = write_exports(run_dir, journal.iter_results("r1", raw=True), {"run_id": "r1"})
    journal.finish_run(0, {"run_id": "r1"})
    filler = run_dir.parent / "filler"
    with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    assert free_bytes(run_dir) < 8192, "the volume is full"
    assert journal.compact(rows) is False
    assert sum(1 for _ in journal.iter_results("r1")) == 400, "the record whole"
    journal.close()

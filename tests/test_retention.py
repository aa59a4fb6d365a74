"""Retention and the list of runs: ``--keep-days`` at the start of every run, ``bulk-tagger
prune`` and ``bulk-tagger runs``.

The nightly test runs one job on 30 simulated nights (the runner's clock moved a day a night,
so its run ids and dates are those nights') with ``--keep-days 7``, next to runs that must
never be pruned: a killed (unfinished) run, a run whose undo is unfinished, and a finished
run a live process holds. ``runs`` and ``prune --dry-run`` are run through the real CLI.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import results, run_cli, write_job
from worker import api, spec, units
from worker.cli import cli
from worker.journal import Journal, read_run_info
from worker.runlock import RunLock
from worker.runner import Runner, RunSettings
from worker.simulator import SimConfig, Simulator, SimulatorThread

JOB = {
    "name": "nightly",
    "targets": [{"query": {"projects": [1337], "regions": [7], "visibility": "private"}}],
    "changes": {"set_tags": {"checked-on": "{run.date}"}},
    "options": {"concurrency": 4},
}
NIGHT0 = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def unfinished(state: Path, run_id: str, *, kind: str = "run", started: datetime,
               parent: str | None = None) -> Path:
    """A run as a killed process leaves it: a journal with its run row and no exit code."""
    journal = Journal(state / run_id)
    journal.create_run(run_id=run_id, kind=kind, job_name="nightly", job_path=None,
                       job_hash="x", options={}, parent_run_id=parent,
                       started_at=started.isoformat().replace("+00:00", "Z"))
    journal.close()
    return state / run_id


@pytest.fixture
def held() -> Iterator[list[int]]:
    """Descriptors holding run locks, as a live process would; let go after the test."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


async def test_thirty_nights_keep_a_week_and_never_an_unfinished_run(
    tmp_path: Path, sim_factory: object, held: list[int]
) -> None:
    sim: Simulator = await sim_factory(SimConfig(images=30))  # type: ignore[operator]
    job = spec.load_job(write_job(tmp_path, JOB))
    state = tmp_path / "state"
    ran: list[str] = []
    for night in range(30):
        moment = NIGHT0 + timedelta(days=night)
        if night == 3:  # a run killed that night: unfinished, it stays whatever its age
            unfinished(state, "killed-night-3", started=moment)
        settings = RunSettings(
            state_dir=state, api=api.Settings(base_url=sim.url, api_key="k"), keep_days=7,
            clock=lambda moment=moment: moment + timedelta(minutes=1), out=io.StringIO(),
            progress=io.StringIO(), env={},
        )
        code = await Runner(settings, kind="run", job=job).execute()
        assert code == 0, settings.out.getvalue()  # type: ignore[attr-defined]
        (run_id,) = {p.name for p in state.iterdir()} - set(ran) - {"killed-night-3"} - {
            f"undo-of-{r}" for r in ran}
        ran.append(run_id)
        assert run_id.startswith(f"nightly-{moment:%Y%m%d}T")
        if night == 5:  # an undo of this run, killed: the run it undoes must stay
            unfinished(state, f"undo-of-{run_id}", kind="undo", started=moment, parent=run_id)
        if night == 8:  # a finished run a live process holds (e.g. an operator's resume)
            fd = os.open(state / run_id / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)

    kept = {p.name for p in state.iterdir()}
    protected = {ran[5], ran[8], "killed-night-3", f"undo-of-{ran[5]}"}
    assert protected <= kept
    recent = kept - protected
    assert 7 <= len(recent) <= 8, sorted(recent)
    assert recent == set(ran[-len(recent):])  # the newest nights
    for run_id in ran:
        assert (run_id in kept) == (run_id in recent or run_id in protected)

    # every kept run's report prints all its lines (its journal compacted: read from .gz)
    for run_id in sorted(kept - {"killed-night-3", f"undo-of-{ran[5]}"}):
        info = read_run_info(state / run_id)
        assert info["exit_code"] == 0
        out = CliRunner().invoke(cli, ["report", run_id, "--state-dir", str(state),
                                       "--format", "jsonl"])
        assert out.exit_code == 0, out.output
        lines = [json.loads(line) for line in out.output.splitlines()]
        assert len(lines) == sum(info["summary"]["counts"].values()) > 0
        assert lines == results(state / run_id)
        night = ran.index(run_id)
        date = f"{NIGHT0 + timedelta(days=night):%Y-%m-%d}"
        assert all(r["status"] == "updated" and r["patch"]["tags"]["checked-on"] == date
                   for r in lines)


def test_runs_and_prune_dry_run_through_the_cli(tmp_path: Path) -> None:
    state = tmp_path / "state"
    job = write_job(tmp_path, JOB)
    with SimulatorThread(SimConfig(images=30)) as sim:
        for run_id in ("first", "second"):
            proc = run_cli("run", job, "--base-url", sim.url, "--state-dir", state,
                           "--run-id", run_id)
            assert proc.returncode == 0, proc.stderr[-3000:]
        # a finished run's record is compacted: there is nothing left to resume in it
        proc = run_cli("run", job, "--base-url", sim.url, "--state-dir", state, "--resume",
                       "--run-id", "first")
        assert proc.returncode == 2 and "run first has finished" in proc.stderr, proc.stderr
    unfinished(state, "killed", started=datetime.now(UTC) - timedelta(days=90))
    (state / "not-a-run").mkdir()

    proc = run_cli("runs", "--state-dir", state)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:6] == ["RUN", "JOB", "KIND", "STARTED", "DURATION", "EXIT"]
    assert [line.split()[0] for line in lines[1:]] == ["second", "first", "killed"]
    assert "unchanged=8" in lines[1] and "updated=8" in lines[2] and "(unfinished)" in lines[3]
    assert "not-a-run" not in proc.stdout

    proc = run_cli("runs", "--state-dir", state, "--format", "json")
    listed = json.loads(proc.stdout)
    assert [r["run_id"] for r in listed] == ["second", "first", "killed"]
    first = listed[1]
    assert first["job"] == "nightly" and first["kind"] == "run" and first["exit_code"] == 0
    assert first["finished"] and first["counts"] == {"updated": 8}
    assert first["bytes"] > 0 and first["duration_s"] >= 0
    assert listed[2]["finished"] is False and listed[2]["exit_code"] is None
    # a run's duration reads the same in the runs table and in its report (worker.units)
    took = units.duration_text(first["duration_s"])
    assert lines[2].split()[4] == took and took.endswith("s"), lines[2]
    assert f"({took})" in run_cli("report", "first", "--state-dir", state).stdout

    # everything finished is older than 0 s: both would go, the unfinished one never
    proc = run_cli("prune", "--state-dir", state, "--older-than", "0s", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would delete second" in proc.stdout and "would delete first" in proc.stdout
    assert "killed" not in proc.stdout and "would delete 2 run(s)" in proc.stdout
    assert {p.name for p in state.iterdir()} == {"first", "second", "killed", "not-a-run"}

    # the newest finished run kept whatever its age; nothing else old enough by default
    proc = run_cli("prune", "--state-dir", state, "--keep-last", "1")
    assert proc.returncode == 0, proc.stderr
    assert "deleted first" in proc.stdout and "deleted 1 run(s)" in proc.stdout
    assert {p.name for p in state.iterdir()} == {"second", "killed", "not-a-run"}
    proc = run_cli("prune", "--state-dir", state)  # default: older than 30 days
    assert "deleted 0 run(s)" in proc.stdout
    assert {p.name for p in state.iterdir()} == {"second", "killed", "not-a-run"}

    proc = run_cli("prune", "--state-dir", state, "--older-than", "soon")
    assert proc.returncode == 2 and "--older-than" in proc.stderr
    # weeks, as a job file's ages take them: nothing here is two weeks old
    proc = run_cli("prune", "--state-dir", state, "--older-than", "2w", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would delete 0 run(s)" in proc.stdout


def test_runs_shows_a_run_a_live_process_holds_as_running(tmp_path: Path) -> None:
    """A run whose lock a live process holds (this test's, by RunLock.acquire, as a run
    takes it) is listed as running with its holder, by `runs` in another process; the
    holder's fields come from the lock file, so they are printed escaped."""
    state = tmp_path / "state"
    live = unfinished(state, "live", started=datetime.now(UTC) - timedelta(minutes=5))
    unfinished(state, "killed", started=datetime.now(UTC) - timedelta(hours=1))
    done = unfinished(state, "done", started=datetime.now(UTC) - timedelta(hours=2))
    journal = Journal(done)
    journal.finish_run(0, {"run_id": "done", "counts": {"updated": 3}})
    journal.close()
    lock = RunLock.acquire(live, run_id="live", command="bulk-tagger run nightly.yaml")
    other = RunLock.acquire(done, run_id="done", command="bulk-tagger prune")
    try:
        holder = json.loads((live / "run.lock").read_bytes())
        assert holder["pid"] == os.getpid()
        # what the file says is shown as it says it: here a host with a terminal escape
        (live / "run.lock").write_bytes(json.dumps({**holder, "host": "node-1\x1b[2J"}).encode())
        proc = run_cli("runs", "--state-dir", state)
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout
        rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
        assert (f"running (pid {os.getpid()} on node-1\\x1b[2J since {holder['since']}"
                " (bulk-tagger run nightly.yaml))") in rows["live"]
        assert "- (unfinished)" in rows["killed"] and "running" not in rows["killed"]
        assert f"0 (held by pid {os.getpid()} on " in rows["done"]  # finished, being pruned

        proc = run_cli("runs", "--state-dir", state, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout and "\\u001b" in proc.stdout
        listed = {r["run_id"]: r for r in json.loads(proc.stdout)}
        assert listed["live"]["running"] is True and listed["live"]["finished"] is False
        assert listed["live"]["holder"] == {"pid": os.getpid(), "host": "node-1\x1b[2J",
                                            "since": holder["since"],
                                            "command": "bulk-tagger run nightly.yaml"}
        assert listed["killed"]["running"] is False and listed["killed"]["holder"] is None
        assert listed["done"]["running"] is False and listed["done"]["finished"] is True
        assert listed["done"]["holder"]["command"] == "bulk-tagger prune"
    finally:
        lock.release()
        other.release()
    # its holder gone (as when the process ends), the run is unfinished again
    proc = run_cli("runs", "--state-dir", state, "--format", "json")
    listed = {r["run_id"]: r for r in json.loads(proc.stdout)}
    assert listed["live"]["running"] is False and listed["live"]["holder"] is None
    proc = run_cli("runs", "--state-dir", state)
    assert "- (unfinished)" in next(line for line in proc.stdout.splitlines()
                                   if line.startswith("live"))

"""Interrupted runs and ``--resume``, with the real CLI in a subprocess against a simulator.

- SIGKILL at seeded random points (in the plan, or once the simulator has seen a seeded share
  of the PATCHes: some outcomes are committed, some still buffered), then ``--resume``
  with the same state dir: every target has exactly one final line, the simulator ends as the
  job says, and no target whose outcome the journal had committed at the kill is PATCHed again
  (the simulator's per-image counters, taken after the kill, against the journal read after
  the kill and before the resume). ``make test`` runs three seeds, ``-m slow`` many more.
- SIGTERM: exit 75 within ``--grace-seconds`` (in-flight requests that outlast the grace are
  abandoned; a second signal stops at once), exports written, then ``--resume`` finishes.
- A changed job file refuses to resume (exit 2, nothing sent) a run stopped by SIGTERM in its
  plan; ``--resume`` with nothing to resume starts a new run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Key, images, results, summary, write_job
from worker.journal import read_run_info
from worker.simulator import Faults, SimConfig, SimulatorThread

JOB: dict[str, Any] = {
    "name": "resume-test",
    # 2000 images in the simulator, about 700 of them targets (project 1337's private ones in
    # two of its regions)
    "targets": [{"query": {"projects": [1337], "regions": [7, 38], "visibility": "private"}}],
    "changes": {
        "set_tags": {"managed-by": "bulk-tagger", "wave": "w7"},
        "remove_tags": ["legacy"],
        "set": {"ssh_key": "allow"},
    },
    # small pages make the plan phase long enough to be killed in, sometimes
    "options": {"concurrency": 16, "page_size": 100},
}
FINAL = ("updated", "unchanged", "skipped", "failed")


# -- helpers ----------------------------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GCORE_", "BULK_TAGGER_", "JOB_COMPLETION_INDEX"))}
    env["GCORE_API_KEY"] = "resume-test-key"
    env.update(extra)
    return env


@dataclass
class Cli:
    """One ``bulk-tagger`` process; its stdout and stderr go to files (no pipe to fill up)."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @classmethod
    def start(cls, folder: Path, name: str, *args: str | Path) -> Cli:
        out, err = folder / f"{name}.out", folder / f"{name}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", *map(str, args), "--log-format", "json"],
                stdout=fo, stderr=fe, env=cli_env(),
            )
        return cls(proc, out, err)

    def wait(self, limit_s: float = 120.0) -> int:
        return self.proc.wait(limit_s)

    def running(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.out.read_text() + "\n--- stderr\n" + self.err.read_text()[-4000:]

    def events(self) -> list[dict[str, Any]]:
        lines = self.err.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def run_cli(folder: Path, name: str, *args: str | Path) -> Cli:
    cli = Cli.start(folder, name, *args)
    cli.wait()
    return cli


def run_args(job: Path, sim: SimulatorThread, state: Path, *extra: str) -> list[str | Path]:
    return ["run", job, "--base-url", sim.url, "--state-dir", state, *extra]


def wait_until(predicate: Callable[[], bool], cli: Cli, limit_s: float = 60.0,
               step_s: float = 0.01) -> None:
    """Poll until ``predicate`` holds; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if not cli.running():
            pytest.fail("the run ended before the point it was to be stopped at:\n" + cli.text())
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {limit_s} s:\n" + cli.text())
        time.sleep(step_s)


def the_run(state: Path) -> Path:
    runs = [p for p in state.iterdir() if (p / "journal.sqlite").exists()]
    assert len(runs) == 1, f"expected one run folder, found {[p.name for p in runs]}"
    return runs[0]


def journal_query(state: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the live journal as another process would (read-only: never creates it)."""
    runs = [p for p in state.iterdir() if (p / "journal.sqlite").exists()] if state.exists() else []
    if not runs:
        return []
    uri = f"{(runs[0] / 'journal.sqlite').resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the run row or tables are not there yet
        return []


def committed(state: Path) -> dict[Key, tuple[str, int]]:
    """After the process is gone: the outcomes its journal committed, by image."""
    conn = sqlite3.connect(the_run(state) / "journal.sqlite")
    try:
        rows = conn.execute(
            "SELECT t.project_id, t.region_id, t.image_id, o.status, o.attempts"
            " FROM outcomes o JOIN targets t USING (seq)"
        ).fetchall()
    finally:
        conn.close()
    return {(p, r, i): (status, attempts) for p, r, i, status, attempts in rows}


def targeted(image: dict[str, Any]) -> bool:
    return bool(image["visibility"] == "private" and image["project_id"] == 1337
                and image["region_id"] in (7, 38))


def expected(image: dict[str, Any]) -> dict[str, Any]:
    """The job above, done by hand."""
    if not targeted(image):
        return image
    tags = {k: v for k, v in image["tags"].items() if k != "legacy"}
    tags["managed-by"] = ("bulk-tagger", False)
    tags["wave"] = ("w7", False)
    return {**image, "tags": tags, "ssh_key": "allow"}


def settled_counters(sim: SimulatorThread) -> tuple[dict[Key, int], dict[Key, int]]:
    """PATCH counters once requests a dead client left behind have been served."""
    def snap() -> tuple[int, dict[Key, int], dict[Key, int]]:
        c = sim.sim.counters
        return c.total(), dict(c.patches_per_image), dict(c.applied_per_image)

    last = sim.call(snap)
    while True:
        time.sleep(0.15)
        now = sim.call(snap)
        if now[0] == last[0]:
            return now[1], now[2]
        last = now


@pytest.fixture
def fresh_sim() -> Iterator[Callable[..., SimulatorThread]]:
    """``fresh_sim(images=..., latency_ms=...)``: a SimulatorThread, stopped after the test."""
    started: list[SimulatorThread] = []

    def start(images: int = 2000, seed: int = 0, **faults: Any) -> SimulatorThread:
        thread = SimulatorThread(SimConfig(images=images, seed=seed,
                                           faults=Faults(seed=seed, **faults)))
        thread.__enter__()
        started.append(thread)
        return thread

    yield start
    for thread in reversed(started):
        thread.__exit__(None, None, None)


# -- SIGKILL at random points -----------------------------------------------------------------
def kill_and_resume(tmp_path: Path, start: Callable[..., SimulatorThread], seed: int) -> None:
    rng = random.Random(seed)
    sim = start(images=2000, seed=seed, latency_ms=2.0, latency_jitter_ms=2.0)
    initial = images(sim)
    job = write_job(tmp_path, JOB)
    state = tmp_path / "state"

    targets = {k for k, image in initial.items() if targeted(image)}
    first = Cli.start(tmp_path, "first", *run_args(job, sim, state))
    mode = ("in the plan", "early", "after a commit", "after a commit")[seed % 4]
    share = rng.uniform(0.02, 0.8)

    def patches() -> int:
        return int(sim.call(lambda: sim.sim.counters.requests["patch"]))

    # the point is counted in PATCHes the simulator has seen (progress, not time: the same
    # point on a busy machine). Outcomes are committed every second or 500: "early" kills
    # mostly find none committed yet, "after a commit" ones some committed and some buffered.
    if mode == "in the plan":  # once the plan has committed some targets
        wait_until(lambda: bool(journal_query(state, "SELECT 1 FROM targets LIMIT 1")), first)
    elif mode == "early":
        goal = int(share * len(targets))
        wait_until(lambda: patches() >= goal, first, step_s=0.002)
    else:
        wait_until(lambda: bool(journal_query(state, "SELECT 1 FROM outcomes LIMIT 1")), first,
                   step_s=0.005)
        now = patches()
        goal = now + int(share * (len(targets) - now))
        wait_until(lambda: patches() >= goal, first, step_s=0.002)
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert read_run_info(the_run(state))["exit_code"] is None, (
        "the run had finished before the kill: make it longer\n" + first.text())

    # the record as the kill left it, and what the simulator saw until then
    at_kill = committed(state)
    patches_at_kill, _ = settled_counters(sim)
    run_dir = the_run(state)
    assert not (run_dir / "summary.json").exists()

    second = run_cli(tmp_path, "second", *run_args(job, sim, state, "--resume"))
    assert second.proc.returncode == 0, second.text()
    assert any(e["event"] == "run.resumed" for e in second.events()), second.text()
    assert the_run(state) == run_dir  # the same run went on: no second folder

    final = images(sim)
    rows = results(run_dir)
    keys = [(r["project_id"], r["region_id"], r["image_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(targets), "one final line per target"
    assert set(keys) == targets
    # every target needed a change and the run made it, before or after the kill: the record
    # says so for each (a PATCH that landed before the kill is verified by a read)
    assert {r["status"] for r in rows} == {"updated"}, {r["status"] for r in rows}
    assert summary(run_dir)["exit_code"] == 0
    assert summary(run_dir)["counts"]["planned"] == 0

    # the simulator ends as the job says, every image
    wrong = [k for k in initial if final[k] != expected(initial[k])]
    assert not wrong, f"{len(wrong)} images not as planned, e.g. {final[wrong[0]]}"

    # nothing with a committed outcome was sent again; every change was applied exactly once
    patches, applied = settled_counters(sim)
    again = {k: (patches_at_kill.get(k, 0), patches[k]) for k in at_kill
             if patches.get(k, 0) != patches_at_kill.get(k, 0)}
    assert not again, f"PATCHed again after a committed outcome: {list(again.items())[:5]}"
    assert all(applied.get(k) == 1 for k in targets), "each change applied exactly once"
    assert set(applied) == targets
    print(f"seed {seed}: killed {mode} ({share:.0%})"
          f", {len(at_kill)} outcomes committed, {len(targets)} targets; resumed"
          f" {sum(1 for r in rows if r['reason'] == 'verified_by_read')} verified by a read")


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_sigkill_at_a_random_point_then_resume(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread], seed: int
) -> None:
    kill_and_resume(tmp_path, fresh_sim, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, *range(5, 17)])
def test_sigkill_at_many_random_points_then_resume(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread], seed: int
) -> None:
    kill_and_resume(tmp_path, fresh_sim, seed)


# -- SIGTERM ----------------------------------------------------------------------------------
def applying(state: Path) -> bool:
    row = journal_query(state, "SELECT plan_done, (SELECT COUNT(*) FROM outcomes) FROM run")
    return bool(row) and row[0][0] == 1 and row[0][1] > 0


@pytest.mark.timing
def test_sigterm_stops_within_the_grace_period_and_resume_finishes(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    sim = fresh_sim(images=600, latency_ms=15.0)
    # a failure injected: a selector row naming an image that does not exist
    (tmp_path / "extra.csv").write_text(
        "project_id,region_id,image_id\n1337,7,00000000-0000-4000-8000-00000000dead\n")
    job = write_job(tmp_path, {**JOB, "targets": [*JOB["targets"], {"file": "extra.csv"}],
                               "options": {"concurrency": 4}})
    state = tmp_path / "state"
    grace = 3.0
    first = Cli.start(tmp_path, "first",
                      *run_args(job, sim, state, "--grace-seconds", str(grace)))
    wait_until(lambda: applying(state), first, step_s=0.05)
    assert first.running()
    first.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = first.wait()
    took = time.monotonic() - sent
    assert code == 75, first.text()
    assert took <= grace + 1.5, f"exited {took:.2f} s after SIGTERM; grace is {grace} s"
    assert "run.stopping" in first.err.read_text()

    run_dir = the_run(state)
    stopped = summary(run_dir)
    assert stopped["exit_code"] == 75
    rows = results(run_dir)
    targets = stopped["counts"]
    assert len(rows) == sum(targets.values()) == len({r["image_id"] for r in rows})
    assert targets["planned"] > 0, "targets left for the resume"
    assert targets["failed"] == 1  # the missing image, known from the plan

    second = run_cli(tmp_path, "second", *run_args(job, sim, state, "--resume"))
    assert second.proc.returncode == 1, second.text()  # 1: the injected failure
    assert the_run(state) == run_dir
    rows = results(run_dir)
    assert len(rows) == len({r["image_id"] for r in rows}) == sum(targets.values())
    done = summary(run_dir)
    assert done["exit_code"] == 1 and done["counts"]["planned"] == 0
    assert done["counts"]["failed"] == 1
    assert done["counts"]["updated"] + done["counts"]["unchanged"] == len(rows) - 1
    # the summary is the run's, not the last process's: both processes' requests, the run's
    # first start, the time both ran
    served = sim.call(lambda: dict(sim.sim.counters.requests))
    assert done["processes"] == 2 and "processes" not in stopped
    assert done["started_at"] == stopped["started_at"]
    # (the first may have stopped before its first PATCH: the signal comes once it applies)
    assert done["requests"]["patch"] == served["patch"] > 0
    assert stopped["requests"]["list"] > 0 and done["requests"]["list"] == served["list"]
    assert done["requests"]["total"] == sum(served.values())
    assert done["duration_s"] > stopped["duration_s"]
    initial = {k: v for k, v in images(sim).items()}
    assert all(image["tags"].get("wave") == ("w7", False) for image in initial.values()
               if targeted(image))


def slow_patches_after_the_plan(state: Path, sim: SimulatorThread, cli: Cli) -> None:
    """Once the plan is committed, make every answer take 20 s and wait for PATCHes to hang."""
    wait_until(lambda: bool(journal_query(state, "SELECT 1 FROM run WHERE plan_done = 1")),
               cli, step_s=0.02)
    sim.call(sim.sim.set_faults, latency_ms=20_000.0)
    before = sim.call(lambda: sim.sim.counters.requests["patch"])
    wait_until(lambda: sim.call(lambda: sim.sim.counters.requests["patch"]) >= before + 4, cli)


@pytest.mark.timing
def test_the_grace_period_bounds_requests_that_hang(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    sim = fresh_sim(images=300, latency_ms=20.0)
    job = write_job(tmp_path, {**JOB, "options": {"concurrency": 4}})
    state = tmp_path / "state"
    first = Cli.start(tmp_path, "first", *run_args(job, sim, state, "--grace-seconds", "1"))
    slow_patches_after_the_plan(state, sim, first)
    first.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert first.wait() == 75, first.text()
    took = time.monotonic() - sent
    assert took <= 1.0 + 2.0, f"exited {took:.2f} s after SIGTERM; grace is 1 s"
    run_dir = the_run(state)
    assert summary(run_dir)["exit_code"] == 75
    assert summary(run_dir)["counts"]["planned"] > 0  # the hung ones are left for --resume

    sim.call(sim.sim.set_faults, latency_ms=0.0)
    second = run_cli(tmp_path, "second", *run_args(job, sim, state, "--resume"))
    assert second.proc.returncode == 0, second.text()
    done = summary(run_dir)
    assert done["counts"]["planned"] == 0 and done["exit_code"] == 0
    assert len(results(run_dir)) == sum(done["counts"].values())


@pytest.mark.timing
def test_a_second_signal_stops_at_once(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    sim = fresh_sim(images=300, latency_ms=20.0)
    job = write_job(tmp_path, {**JOB, "options": {"concurrency": 4}})
    state = tmp_path / "state"
    first = Cli.start(tmp_path, "first", *run_args(job, sim, state, "--grace-seconds", "60"))
    slow_patches_after_the_plan(state, sim, first)
    first.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert first.running(), "still in its grace period"
    first.proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert first.wait() == 75, first.text()
    took = time.monotonic() - sent
    assert took <= 3.0, f"exited {took:.2f} s after the second signal"
    assert "run.stopping_now" in first.err.read_text()
    assert summary(the_run(state))["exit_code"] == 75


# -- what may be resumed ----------------------------------------------------------------------
def test_a_changed_job_file_refuses_to_resume(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    sim = fresh_sim(images=300, latency_ms=300.0)  # a plan of a few slow pages
    job = write_job(tmp_path, {**JOB, "options": {"concurrency": 4}})
    state = tmp_path / "state"
    first = Cli.start(tmp_path, "first", *run_args(job, sim, state))
    wait_until(lambda: bool(journal_query(state, "SELECT 1 FROM run")), first, step_s=0.01)
    first.proc.send_signal(signal.SIGTERM)  # in the plan: stops at once, nothing was sent
    assert first.wait() == 75, first.text()
    run_dir = the_run(state)
    assert journal_query(state, "SELECT plan_done, exit_code FROM run") == [(0, 75)]
    assert sim.call(lambda: sim.sim.counters.requests["patch"]) == 0
    sim.call(sim.sim.set_faults, latency_ms=0.0)

    changed = dict(JOB, changes={**JOB["changes"], "set_tags": {"wave": "w8"}},
                   options={"concurrency": 4})
    write_job(tmp_path, changed)
    sent = sim.call(sim.sim.counters.total)
    refused = run_cli(tmp_path, "refused", *run_args(job, sim, state, "--resume"))
    assert refused.proc.returncode == 2, refused.text()
    err = refused.err.read_text()
    assert run_dir.name in err and "another version of this job file" in err
    assert "--resume" in err
    assert sim.call(sim.sim.counters.total) == sent, "nothing was sent"
    assert the_run(state) == run_dir

    # the old file finishes it
    write_job(tmp_path, {**JOB, "options": {"concurrency": 4}})
    again = run_cli(tmp_path, "again", *run_args(job, sim, state, "--resume"))
    assert again.proc.returncode == 0, again.text()
    assert summary(run_dir)["counts"]["planned"] == 0


def test_resume_with_nothing_to_resume_starts_a_new_run(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    sim = fresh_sim(images=200)
    job = write_job(tmp_path, JOB)
    state = tmp_path / "state"
    first = run_cli(tmp_path, "first", *run_args(job, sim, state, "--resume"))
    assert first.proc.returncode == 0, first.text()
    run_dir = the_run(state)
    assert not any(e["event"] == "run.resumed" for e in first.events())
    patches = sim.call(lambda: sim.sim.counters.requests["patch"])
    assert summary(run_dir)["counts"]["updated"] == patches > 0

    # a finished run is not resumed either: the next night is a new run, with nothing to do
    second = run_cli(tmp_path, "second", *run_args(job, sim, state, "--resume"))
    assert second.proc.returncode == 0, second.text()
    runs = sorted(p.name for p in state.iterdir())
    assert len(runs) == 2
    newer = state / next(name for name in runs if name != run_dir.name)
    assert summary(newer)["counts"]["unchanged"] == summary(run_dir)["counts"]["updated"]
    assert summary(newer)["counts"]["updated"] == 0
    assert sim.call(lambda: sim.sim.counters.requests["patch"]) == patches

"""``bulk-tagger report RUN_ID``: the run's report again, from its journal alone.

``--format summary`` prints what the run printed, ``json`` is summary.json, ``jsonl`` carries
the lines of the run's results.jsonl.gz and ``csv`` the same rows, and ``--export`` writes the
plain results.jsonl (byte for byte what results.jsonl.gz holds), results.csv and summary.json,
also for a run that was killed before it could write them.
"""

from __future__ import annotations

import csv
import gzip
import html
import io
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.runlock import RunLock
from worker.simulator import SimConfig, SimulatorThread

JOB = {
    "name": "report-test",
    "targets": [{"query": {"projects": "all", "regions": "all"}}, {"file": "rows.csv"}],
    "changes": {"set_tags": {"managed-by": "bulk-tagger", "note": "café-ü"},
                "remove_tags": ["legacy"], "rename_tags": {"team": "owner"},
                "set": {"ssh_key": "allow"}},
    "options": {"concurrency": 4},
}
EXPORTS = ("results.jsonl", "results.csv", "summary.json")  # what --export writes
OBJECTS = ("before", "after", "patch")


def bulk_tagger(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
                wait: bool = True) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    full["GCORE_API_KEY"] = "report-test-key"
    full.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "worker", *map(str, args)], cwd=cwd,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.communicate(timeout=120)
    return proc


def output(*args: str | Path, **kw: Any) -> tuple[int, str, str]:
    proc = bulk_tagger(*args, wait=False, **kw)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def write_job(folder: Path) -> Path:
    (folder / "rows.csv").write_text(  # one row naming an image that does not exist: failed
        "project_id,region_id,image_id\n1337,7,00000000-0000-4000-8000-00000000dead\n")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(JOB, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def csv_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        decoded: dict[str, Any] = dict(row)
        for name in OBJECTS:
            decoded[name] = json.loads(row[name]) if row[name] else None
        rows.append(decoded)
    return rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A finished run with every status but ``planned``: (state dir, run id, its stdout)."""
    folder = tmp_path_factory.mktemp("report")
    with SimulatorThread(SimConfig(images=80)) as sim:
        code, out, err = output("run", write_job(folder), "--base-url", sim.url,
                                "--state-dir", folder / "state")
    assert code == 1, err[-3000:]  # the missing image
    (run_dir,) = (folder / "state").iterdir()
    return folder / "state", run_dir.name, out


def test_summary_is_what_the_run_printed(finished: tuple[Path, str, str]) -> None:
    state, run_id, printed = finished
    code, out, _ = output("report", run_id, "--state-dir", state)
    assert code == 0
    assert out.strip() == printed.split("\nreport: ")[0].strip()
    counts = json.loads((state / run_id / "summary.json").read_text())["counts"]
    assert {s for s, n in counts.items() if n} == {"updated", "skipped", "failed"}


def test_the_command_a_summary_names_runs_as_printed(
    finished: tuple[Path, str, str], tmp_path: Path
) -> None:
    """The command exit code 1 names (it lists the failed targets) carries the --state-dir
    the report was read from (quoted for a shell), except the default ./runs: run as printed,
    from another folder, it prints the run's failed rows."""
    state, run_id, _ = finished
    failed = json.loads((state / run_id / "summary.json").read_text())["counts"]["failed"]
    for where, cwd in ((tmp_path / "the team's runs", tmp_path / "elsewhere"),
                       (tmp_path / "runs", tmp_path)):  # the default: no --state-dir
        shutil.copytree(state / run_id, where / run_id)
        cwd.mkdir(exist_ok=True)
        args = ("--state-dir", where) if where.name != "runs" else ()
        code, out, err = output("report", run_id, *args, cwd=tmp_path)
        assert code == 0, err
        (line,) = [line for line in out.splitlines() if line.startswith("Exit code 1:")]
        match = re.search(r"`(bulk-tagger [^`]+)` lists them", line)
        assert match, line
        printed = match.group(1)
        tail = f" --state-dir {shlex.quote(str(where))}" if args else ""
        assert printed == f"bulk-tagger report {run_id} --format jsonl --status failed{tail}"
        print(printed)
        words = shlex.split(printed)
        assert words[0] == "bulk-tagger"
        code, out, err = output(*words[1:], cwd=cwd)
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == failed >= 1 and {r["status"] for r in rows} == {"failed"}


def test_json_is_summary_json(finished: tuple[Path, str, str]) -> None:
    state, run_id, _ = finished
    code, out, _ = output("report", run_id, "--state-dir", state, "--format", "json")
    assert code == 0
    assert json.loads(out) == json.loads((state / run_id / "summary.json").read_text())


def test_jsonl_and_csv_carry_the_rows_of_the_exports(finished: tuple[Path, str, str]) -> None:
    state, run_id, _ = finished
    run_dir = state / run_id
    code, out, _ = output("report", run_id, "--state-dir", state, "--format", "jsonl")
    assert code == 0
    printed = [json.loads(line) for line in out.splitlines()]
    with gzip.open(run_dir / "results.jsonl.gz", "rt", encoding="utf-8") as fh:
        exported = [json.loads(line) for line in fh]
    assert printed == exported
    assert not (run_dir / "results.jsonl").exists() and not (run_dir / "results.csv").exists()
    assert len({(r["project_id"], r["region_id"], r["image_id"]) for r in printed}) == len(
        printed)
    assert any(r["patch"] and r["patch"]["tags"].get("note") == "café-ü" for r in printed)

    code, out, _ = output("report", run_id, "--state-dir", state, "--format", "csv")
    assert code == 0
    from_report = csv_rows(out)
    code, _, err = output("report", run_id, "--state-dir", state, "--export")
    assert code == 0, err
    from_export = csv_rows((run_dir / "results.csv").read_text("utf-8"))
    assert from_report == from_export
    assert len(from_report) == len(printed)
    assert list(from_report[0]) == list(printed[0])  # the same columns, in the same order


def test_export_writes_the_files_anew_byte_for_byte(
    finished: tuple[Path, str, str], tmp_path: Path
) -> None:
    state, run_id, _ = finished
    copy = tmp_path / "state"
    copy.mkdir()
    (copy / run_id).mkdir()
    for f in (state / run_id).iterdir():
        (copy / run_id / f.name).write_bytes(f.read_bytes())
    compressed = (copy / run_id / "results.jsonl.gz").read_bytes()
    originals = {"results.jsonl": gzip.decompress(compressed),
                 "summary.json": (copy / run_id / "summary.json").read_bytes()}
    for name in EXPORTS:
        (copy / run_id / name).unlink(missing_ok=True)
    # from another directory, with the state dir from the environment
    code, _, err = output("report", run_id, "--export", cwd=tmp_path,
                          env={"BULK_TAGGER_STATE_DIR": str(copy)})
    assert code == 0, err
    for name, data in originals.items():
        assert (copy / run_id / name).read_bytes() == data, name
    assert (copy / run_id / "results.jsonl.gz").read_bytes() == compressed  # left as it was
    rows = csv_rows((copy / run_id / "results.csv").read_text("utf-8"))
    assert len(rows) == len(originals["results.jsonl"].splitlines()) > 0


def wait_planned(journal: Path, proc: subprocess.Popen[str]) -> None:
    """Until the run's plan is committed (its own outcomes too: the missing image's)."""

    def planned() -> bool:
        if not journal.exists():
            return False
        try:
            conn = sqlite3.connect(f"{journal.as_uri()}?mode=ro", uri=True)
            try:
                return bool(conn.execute("SELECT plan_done FROM run").fetchone()[0])
            finally:
                conn.close()
        except (sqlite3.OperationalError, TypeError):  # no table, or no row, yet
            return False

    deadline = time.monotonic() + 60
    while not planned():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)


def test_report_of_a_killed_run(tmp_path: Path) -> None:
    """A run SIGKILLed after its plan: its report (summary, jsonl, --export) is made of its
    journal. The summary and the page say whether a live process still works it (its lock's
    holder, here this test's own, escaped) or its process ended without finishing it, and
    name the command that continues it: run as printed (the base URL from the environment,
    as a deployment sets it), it finishes the same run."""
    with SimulatorThread(SimConfig(images=120)) as sim:
        sim.call(sim.sim.set_faults, latency_ms=100.0)
        state = tmp_path / "state"
        job = write_job(tmp_path)
        proc = bulk_tagger("run", job, "--base-url", sim.url, "--state-dir",
                           state, "--run-id", "killed", wait=False)
        journal = state / "killed" / "journal.sqlite"
        wait_planned(journal, proc)
        # a live run can be looked at: the report reads the journal its writer is filling
        code, out, err = output("report", "killed", "--state-dir", state, "--format", "jsonl")
        assert code == 0, err
        assert proc.poll() is None, "still running"
        assert {json.loads(line)["status"] for line in out.splitlines()} >= {"planned"}
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        sim.call(sim.sim.set_faults, latency_ms=0.0)
        assert not (state / "killed" / "summary.json").exists()

        code, out, err = output("report", "killed", "--state-dir", state)
        assert code == 0, err
        assert "killed" in out and "planned" in out
        resume = f"bulk-tagger run {job} --resume --state-dir {state}"
        ended = ("its process ended without finishing it (killed, or the node was lost): "
                 f"`{resume}` continues it")
        assert out.splitlines()[-1] == f"Exit code none: {ended}"
        code, page, err = output("report", "killed", "--state-dir", state, "--format", "html")
        assert code == 0, err
        assert f"<b>Exit code none</b>: {html.escape(ended)}</div>" in page
        assert "still running" not in out + page
        code, out, err = output("report", "killed", "--state-dir", state, "--format", "json")
        assert code == 0, err
        assert json.loads(out)["unfinished"] == {"state": "ended", "continue_with": resume}
        code, out, _ = output("report", "killed", "--state-dir", state, "--format", "jsonl")
        rows = [json.loads(line) for line in out.splitlines()]
        statuses = {r["status"] for r in rows}
        assert "planned" in statuses and "failed" in statuses
        targets = sqlite3.connect(journal).execute("SELECT COUNT(*) FROM targets").fetchone()[0]
        assert len(rows) == targets
        code, _, err = output("report", "killed", "--state-dir", state, "--export")
        assert code == 0, err
        exported = (state / "killed" / "results.jsonl").read_text("utf-8").splitlines()
        assert [json.loads(line) for line in exported] == rows
        summary = json.loads((state / "killed" / "summary.json").read_text())
        assert summary["run_id"] == "killed" and summary["exit_code"] is None
        assert sum(summary["counts"].values()) == len(rows)

        # a live process holds it (this test's lock, as a run takes it): still running
        lock = RunLock.acquire(state / "killed", run_id="killed",
                               command="bulk-tagger run nightly.yaml")
        try:
            holder = json.loads((state / "killed" / "run.lock").read_bytes())
            # what the lock file says is shown as it says it: here a terminal escape
            (state / "killed" / "run.lock").write_bytes(
                json.dumps({**holder, "host": "node-1\x1b[2J"}).encode())
            code, out, err = output("report", "killed", "--state-dir", state)
            assert code == 0, err
            running = (f"still running: pid {os.getpid()} on node-1\\x1b[2J since "
                       f"{holder['since']} (bulk-tagger run nightly.yaml)")
            assert out.splitlines()[-1] == f"Exit code none: {running}"
            assert "\x1b" not in out and "continues it" not in out
            print(out.splitlines()[-1])
            code, page, err = output("report", "killed", "--state-dir", state,
                                     "--format", "html")
            assert code == 0, err
            assert f"<b>Exit code none</b>: {html.escape(running)}</div>" in page
            assert "\x1b" not in page
            code, out, err = output("report", "killed", "--state-dir", state, "--format", "json")
            assert code == 0, err
            assert "\x1b" not in out  # JSON escapes it: \u001b
            assert json.loads(out)["unfinished"] == {"state": "running", "holder": {
                "pid": os.getpid(), "host": "node-1\x1b[2J", "since": holder["since"],
                "command": "bulk-tagger run nightly.yaml"}}
        finally:
            lock.release()

        # killed two days ago: past --resume-within's default, the command reaches back to it
        two_days = datetime.now(UTC) - timedelta(hours=50)
        with sqlite3.connect(journal) as conn:
            conn.execute("UPDATE run SET started_at = ?",
                         (two_days.isoformat(timespec="milliseconds").replace("+00:00", "Z"),))
        conn.close()
        code, out, err = output("report", "killed", "--state-dir", state)
        assert code == 0, err
        resume = f"bulk-tagger run {job} --resume --resume-within 52h --state-dir {state}"
        assert f"`{resume}` continues it" in out.splitlines()[-1]
        print(out.splitlines()[-1])

        # the command as printed continues the same run (the missing image fails: exit 1)
        words = shlex.split(resume)
        code, out, err = output(*words[1:], env={"GCORE_BASE_URL": sim.url})
        assert code == 1, err[-3000:]
        assert '"run.resumed"' in err, err[-3000:]
        assert [p.name for p in state.iterdir()] == ["killed"]
        summary = json.loads((state / "killed" / "summary.json").read_text())
        assert summary["exit_code"] == 1 and summary["counts"]["planned"] == 0


def test_report_of_an_unknown_run_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    code, out, err = output("report", "no-such-run", "--state-dir", tmp_path / "state")
    assert code == 2
    assert "no-such-run" in err and out == ""


def test_a_killed_shard_is_continued_by_the_command_its_report_names(tmp_path: Path) -> None:
    """A sharded run's resume command carries its ``--shard``: run as printed, it continues
    that shard's run, and its targets stay that shard's (the other shard's images are not
    touched)."""
    with SimulatorThread(SimConfig(images=120)) as sim:
        sim.call(sim.sim.set_faults, latency_ms=100.0)
        state = tmp_path / "state"
        job = write_job(tmp_path)
        proc = bulk_tagger("run", job, "--base-url", sim.url, "--state-dir", state,
                           "--run-id", "half", "--shard", "1/2", wait=False)
        wait_planned(state / "half" / "journal.sqlite", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        sim.call(sim.sim.set_faults, latency_ms=0.0)
        code, out, err = output("report", "half", "--state-dir", state)
        assert code == 0, err
        resume = f"bulk-tagger run {job} --resume --shard 1/2 --state-dir {state}"
        assert out.splitlines()[-1].endswith(f"`{resume}` continues it"), out
        code, out, err = output(*shlex.split(resume)[1:], env={"GCORE_BASE_URL": sim.url})
        assert code == 1, err[-3000:]  # the file's missing image fails, as in the first try
        assert '"run.resumed"' in err, err[-3000:]
        assert [p.name for p in state.iterdir()] == ["half"]
        summary = json.loads((state / "half" / "summary.json").read_text())
        assert summary["exit_code"] == 1 and summary["counts"]["planned"] == 0
        targets = sum(summary["counts"].values())
        # about half the estate's images, each changed once: the shard's own (a PATCH the
        # killed process had in flight was never applied, and is sent again)
        applied = sim.call(lambda: dict(sim.sim.counters.applied_per_image))
        assert 0 < len(applied) < targets < 120
        assert set(applied.values()) == {1}

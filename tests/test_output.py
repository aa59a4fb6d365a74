"""What the output says, through the real CLI: a plan speaks of a plan, skipped and failed
targets are counted by reason, an undone run is not undone twice, and `report` finds a plan
or an undo by the folder the command printed.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

from tests.helpers import results, run_cli, run_dirs, summary
from worker.simulator import SimulatorThread

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"


def _folder(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("report: ")]
    return Path(line.removeprefix("report: "))


def _by_reason(rows: list[dict[str, object]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for row in rows:
        if row["status"] in ("skipped", "failed"):
            out.setdefault(str(row["status"]), Counter())[str(row["reason"])] += 1
    return {status: dict(n) for status, n in out.items()}


def test_plan_ends_with_a_plans_banner_and_report_finds_it(tmp_path: Path) -> None:
    proc = run_cli("plan", DEMO, "--simulate", "--state-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Exit code 0: the plan is made; nothing was changed" in proc.stdout
    assert "every target ended" not in proc.stdout
    assert "\n  updated " not in proc.stdout  # a plan updates nothing: no such row
    assert proc.stdout.startswith("Plan: ")
    folder = _folder(proc.stdout)
    again = run_cli("report", folder, "--state-dir", tmp_path / "elsewhere")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"Plan {folder.name} of job demo-retag")
    assert "would update" in again.stdout and "the plan is made" in again.stdout


def test_skips_and_failures_are_counted_by_reason(tmp_path: Path) -> None:
    proc = run_cli("run", DEMO, "--simulate", "--state-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    expected = _by_reason(results(run_dir))
    assert expected["skipped"]["rename_conflict"] > 0  # the demo data has some
    assert summary(run_dir)["reasons"] == expected
    report = run_cli("report", run_dir.name, "--state-dir", tmp_path)
    for text in (proc.stdout, report.stdout):
        assert "Skipped, by reason:" in text
        n = expected["skipped"]["rename_conflict"]
        assert any(line.split() == ["rename_conflict", str(n)] for line in text.splitlines())
        assert "Images matched, by selector:" in text


def test_undo_of_an_undone_run_says_so_and_report_finds_the_undo(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    base = ("--base-url", sim_thread.url, "--state-dir", tmp_path)
    run = run_cli("run", DEMO, *base)
    assert run.returncode == 0, run.stderr
    run_dir = _folder(run.stdout)
    undo = run_cli("undo", run_dir, *base)  # the folder the run printed does as its id
    assert undo.returncode == 0, undo.stderr
    undo_dir = _folder(undo.stdout)
    assert undo.stdout.startswith(f"Undo {undo_dir.name} of job demo-retag (undoes run "
                                  f"{run_dir.name})")
    sent = json.dumps(sim_thread.call(sim_thread.sim.counters.as_dict)["requests"])
    again = run_cli("undo", run_dir.name, *base)
    assert again.returncode == 2, again.stderr
    assert f"run {run_dir.name} was undone already, by {undo_dir.name}" in again.stderr
    # the hint's command, copied as it stands, finds the undo in this state folder
    shows = shlex.join(["bulk-tagger", "report", undo_dir.name, "--state-dir", str(tmp_path)])
    assert f"`{shows}` shows what it did" in again.stderr
    assert json.dumps(sim_thread.call(sim_thread.sim.counters.as_dict)["requests"]) == sent
    for ref in (undo_dir.name, str(undo_dir)):
        report = run_cli("report", ref, "--state-dir", tmp_path)
        assert report.returncode == 0, report.stderr
        assert report.stdout.startswith(f"Undo {undo_dir.name}")

"""`bulk-tagger plan` and the safety limits, as a user runs them: the real CLI, over HTTP."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tests.helpers import results, run_cli, run_dirs, summary, write_job
from worker.simulator import SimConfig, SimulatorThread

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo.yaml"


def test_plan_on_demo_data_sends_gets_only(sim_thread: SimulatorThread, tmp_path: Path) -> None:
    before = sim_thread.call(sim_thread.sim.images)
    proc = run_cli("plan", DEMO, "--base-url", sim_thread.url, "--state-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    counters = sim_thread.call(sim_thread.sim.counters.as_dict)
    assert counters["requests"]["patch"] == 0
    assert counters["requests"]["list"] > 0
    assert sim_thread.call(sim_thread.sim.images) == before
    # the diff a person reads, and the plan in the run folder
    assert "managed-by" in proc.stdout
    (run_dir,) = run_dirs(tmp_path)
    rows = results(run_dir)
    assert rows and {r["status"] for r in rows} <= {"planned", "unchanged", "skipped", "failed"}
    planned = [r for r in rows if r["status"] == "planned"]
    assert planned and all(r["patch"] for r in planned)
    assert summary(run_dir)["counts"]["planned"] == len(planned)


def _job(tmp_path: Path, **options: Any) -> Path:
    return write_job(tmp_path, {
        "name": "limits",
        "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
        "changes": {"set_tags": {"stamp": "x"}},
        "options": options,
    })


def test_max_changes_stops_before_any_patch(sim_thread: SimulatorThread, tmp_path: Path) -> None:
    job = _job(tmp_path, max_changes=5)
    proc = run_cli("run", job, "--base-url", sim_thread.url, "--state-dir", tmp_path / "s")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "max_changes 5" in proc.stdout
    assert sim_thread.call(lambda: sim_thread.sim.counters.requests["patch"]) == 0
    # the flag overrides the job
    proc = run_cli("run", _job(tmp_path), "--base-url", sim_thread.url,
                   "--state-dir", tmp_path / "s", "--max-changes", "1")
    assert proc.returncode == 3
    assert sim_thread.call(lambda: sim_thread.sim.counters.requests["patch"]) == 0


def test_max_changes_percent(sim_thread: SimulatorThread, tmp_path: Path) -> None:
    job = _job(tmp_path, max_changes_percent=10)
    proc = run_cli("plan", job, "--base-url", sim_thread.url, "--state-dir", tmp_path / "s")
    assert proc.returncode == 3
    assert "max_changes_percent" in proc.stdout
    assert sim_thread.call(lambda: sim_thread.sim.counters.requests["patch"]) == 0
    # the flag overrides the job, as undo's does: a looser share lets the same plan through
    proc = run_cli("plan", job, "--base-url", sim_thread.url, "--state-dir", tmp_path / "s",
                   "--max-changes-percent", "100")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", _job(tmp_path), "--base-url", sim_thread.url,
                   "--state-dir", tmp_path / "s", "--max-changes-percent", "10")
    assert proc.returncode == 3 and "max_changes_percent 10" in proc.stdout
    assert sim_thread.call(lambda: sim_thread.sim.counters.requests["patch"]) == 0


def test_shards_split_the_job_and_share_the_rate(tmp_path: Path) -> None:
    config = SimConfig(images=240)
    with SimulatorThread(config) as st:
        job = write_job(tmp_path, {
            "name": "sharded",
            "targets": [{"query": {"projects": "all", "regions": "all"}}],
            "changes": {"set_tags": {"sharded": "yes"}},
        })
        outs: dict[int, Any] = {}

        def shard(i: int) -> None:
            outs[i] = run_cli("run", job, "--base-url", st.url, "--state-dir", tmp_path / "s",
                              "--rate", "60", env={"JOB_COMPLETION_INDEX": str(i),
                                                   "BULK_TAGGER_SHARDS": "3"})

        threads = [threading.Thread(target=shard, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3):
            assert outs[i].returncode in (0, 1), outs[i].stderr
        dirs = run_dirs(tmp_path / "s")
        assert len(dirs) == 3 and all("shard" in d.name for d in dirs)
        keys = [(r["project_id"], r["region_id"], r["image_id"]) for d in dirs for r in results(d)]
        everything = {(i["project_id"], i["region_id"], i["id"]) for i in st.call(st.sim.images)}
        assert len(keys) == len(set(keys))  # disjoint
        assert set(keys) == everything  # complete
        counters = st.call(st.sim.counters.as_dict)
        assert counters["rate_limited"] == 0
        assert counters["max_per_second"] <= 60  # three shards of 20/s each

"""A resumed run reads its pending targets by list pages (README: Resume), with the real CLI
against a simulator.

A run stopped by SIGTERM while applying; meanwhile someone else changed three of its pending
images: one got a tag of theirs through the API, one was deleted, one is locked by a task for
a while. ``--resume`` then reads at most pending/100 + regions (one list page a region here),
not one GET a pending image; plans each target again against what it is now (the changed one:
its record's ``before`` is what the resume read, their tag kept; the deleted one: ``failed`` /
``not_found``; the locked one: waited for, then sent); sends nothing to a target with a final
record; and ends with one record per target.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests import test_resume
from tests.test_ownership import stopped_while_applying
from tests.test_resume import (
    Cli,
    Key,
    committed,
    results,
    run_args,
    settled_counters,
    summary,
    targeted,
    the_run,
    wait_until,
)
from worker.simulator import SimulatorThread

fresh_sim = test_resume.fresh_sim  # the fixture, shared


def patch_as_someone_else(sim: SimulatorThread, key: Key, body: dict[str, object]) -> None:
    p, r, image_id = key
    request = urllib.request.Request(
        f"{sim.url}/cloud/v1/images/{p}/{r}/{image_id}", data=json.dumps(body).encode(),
        method="PATCH", headers={"Authorization": "APIKey someone-else",
                                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_a_resume_reads_by_the_page_and_plans_again_against_what_is_there_now(
    tmp_path: Path, fresh_sim: Callable[..., SimulatorThread]
) -> None:
    # one page of 1,000 a region: the two regions' lists cost two reads
    sim, job, state = stopped_while_applying(tmp_path, fresh_sim)
    run_dir = the_run(state)
    ended = committed(state)
    pending = [k for k, image in sorted(
        (k, v) for k, v in test_resume.images(sim).items() if targeted(v)) if k not in ended]
    assert len(pending) > 300, "most targets left for the resume"
    regions = len({(p, r) for p, r, _ in pending})

    changed, deleted, locked = pending[0], pending[1], pending[2]
    patch_as_someone_else(sim, changed, {"tags": {"owner": "them"}})
    sim.call(sim.sim.delete_image, *deleted)
    task = sim.call(sim.sim.lock_image, *locked, None)
    patches_before, _ = settled_counters(sim)
    before = sim.call(lambda: dict(sim.sim.counters.requests))

    second = Cli.start(tmp_path, "second", *run_args(
        job, sim, state, "--resume", "--lock-poll-seconds", "0.2"))
    # everything else ended: only the locked one waits (its task then ends)
    wait_until(lambda: len(committed(state)) >= len(ended) + len(pending) - 1, second)
    sim.call(sim.sim.end_task, task)
    second.wait()
    assert second.proc.returncode == 1, second.text()  # 1: the deleted image
    after = sim.call(lambda: dict(sim.sim.counters.requests))
    reads = (after["list"] - before["list"]) + (after["get"] - before["get"])
    # the locked image is read once more when its task has ended
    assert reads <= len(pending) / 100 + regions + 1, (reads, len(pending), after)
    assert after["patch"] - before["patch"] == len(pending) - 1

    rows = {(r["project_id"], r["region_id"], r["image_id"]): r for r in results(run_dir)}
    assert len(rows) == len(results(run_dir)) == summary(run_dir)["counts"]["updated"] + 1
    assert rows[changed]["status"] == "updated"
    assert rows[changed]["before"]["tags"]["owner"] == "them", "planned against what it is now"
    assert rows[changed]["after"]["tags"]["owner"] == "them"
    assert rows[changed]["after"]["tags"]["wave"] == "w7"
    assert (rows[deleted]["status"], rows[deleted]["reason"]) == ("failed", "not_found")
    assert rows[locked]["status"] == "updated" and rows[locked]["lock_wait_s"] > 0
    patches, _ = settled_counters(sim)
    again = [k for k in ended if patches.get(k, 0) != patches_before.get(k, 0)]
    assert not again, f"sent again after a final record: {again[:5]}"

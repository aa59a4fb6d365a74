"""``run --plan PLAN_RUN_ID`` applies the plan a person reviewed, and ``undo --plan`` previews
an undo: the real CLI in a subprocess against a simulator (README, "Apply a reviewed plan")."""

from __future__ import annotations

import json
import shlex
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import results, run_cli, summary, write_job
from worker.journal import read_run_info
from worker.plan import apply_patch
from worker.simulator import SimConfig, SimulatorThread

Key = tuple[int, int, str]
JOB: dict[str, Any] = {
    "name": "reviewed",
    "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
    "changes": {"set_tags": {"reviewed": "by-ops", "owner": "{tags.team|nobody}"},
                "remove_tags": ["legacy"]},
}


@pytest.fixture
def sim() -> Any:
    with SimulatorThread(SimConfig(images=120)) as thread:
        yield thread


def key_of(row: dict[str, Any]) -> Key:
    return (int(row["project_id"]), int(row["region_id"]), str(row.get("image_id", row.get("id"))))


def states(sim: SimulatorThread) -> dict[Key, dict[str, Any]]:
    """Each image's writable state, as ``Image.state`` has it (tags as a mapping)."""
    out = {}
    for image in sim.call(sim.sim.images):
        state = {k: v for k, v in image.items() if k in ("name", "ssh_key", "os_type",
                                                          "hw_firmware_type", "hw_machine_type",
                                                          "is_baremetal")}
        state["tags"] = {t["key"]: t["value"] for t in image["tags"]}
        out[key_of(image)] = state
    return out


def patches(sim: SimulatorThread) -> dict[Key, int]:
    counts = sim.call(lambda: dict(sim.sim.counters.patches_per_image))
    return {tuple(k): n for k, n in counts.items()}  # type: ignore[misc]


def patch_image(sim: SimulatorThread, key: Key, body: dict[str, Any]) -> None:
    """Someone else changes an image, through the API."""
    p, r, image_id = key
    request = urllib.request.Request(
        f"{sim.url}/cloud/v1/images/{p}/{r}/{image_id}", method="PATCH",
        data=json.dumps(body).encode(),
        headers={"Authorization": "APIKey test-key-1234", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def run_id_of(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("report: ")]
    return Path(line.removeprefix("report: ")).name


def cli(sim: SimulatorThread, state: Path, *args: str | Path) -> Any:
    return run_cli(*args, "--base-url", sim.url, "--state-dir", state)


def plan_job(sim: SimulatorThread, tmp_path: Path) -> tuple[Path, Path, Any]:
    """(state folder, job file, the plan's process) of ``bulk-tagger plan`` on JOB."""
    state = tmp_path / "state"
    job = write_job(tmp_path, JOB)
    proc = cli(sim, state, "plan", job)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return state, job, proc


def test_an_apply_sends_exactly_the_plan_and_skips_what_changed_since(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    state, job, proc = plan_job(sim, tmp_path)
    plan_id = run_id_of(proc.stdout)
    planned = {key_of(r): r for r in results(state / plan_id) if r["status"] == "planned"}
    assert len(planned) > 20
    # the plan in aggregate, on the terminal and in report --format json, as counted here
    report = run_cli("report", plan_id, "--state-dir", state, "--format", "json")
    per_key = json.loads(report.stdout)["changes_per_key"]
    for key in ("owner", "reviewed", "legacy"):
        rows = [r for r in planned.values() if key in r["patch"]["tags"]]
        held = [r["before"]["tags"][key] for r in rows if key in r["before"]["tags"]]
        sets = [r for r in rows if r["patch"]["tags"][key] is not None]
        assert per_key[f"tags.{key}"] == {
            "set": len(sets), "added": len(sets) - len(held) if sets else 0,
            "changed": len(held) if sets else 0,
            "from_distinct_values": len(set(held)) if sets else 0,
            "removed": len(rows) - len(sets), "renamed": {}, "kept": 0,
        }, key
    assert f"tags.legacy: removed on {per_key['tags.legacy']['removed']}" in proc.stdout
    owner = per_key["tags.owner"]
    assert (f"tags.owner: set on {owner['set']} (added on {owner['added']}; changed on "
            f"{owner['changed']}, from {owner['from_distinct_values']} distinct values)"
            ) in proc.stdout
    # someone else changes three of the planned images after the review
    changed = sorted(planned)[:3]
    for key in changed:
        patch_image(sim, key, {"tags": {"note": "changed-by-someone"}})
    sim.call(sim.sim.reset_counters)
    seen = states(sim)

    proc = cli(sim, state, "run", job, "--plan", plan_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"applied the plan {plan_id}" in proc.stdout
    apply_id = run_id_of(proc.stdout)
    assert summary(state / apply_id)["plan_run_id"] == plan_id
    rows = {key_of(r): r for r in results(state / apply_id)}
    assert set(rows) == set(planned)  # the plan's targets and nothing else
    for key in changed:
        assert (rows[key]["status"], rows[key]["reason"]) == ("skipped", "conflict")
    # exactly one PATCH per planned, unchanged image and none elsewhere; each image now is
    # what the plan's own patch makes of the state the plan read
    sent = patches(sim)
    assert set(sent) == set(planned) - set(changed)
    assert set(sent.values()) == {1}
    after = states(sim)
    for key, row in planned.items():
        if key in changed:
            assert after[key] == seen[key]
        else:
            assert rows[key]["status"] == "updated"
            assert rows[key]["patch"] == row["patch"]
            assert after[key] == apply_patch(row["before"], row["patch"])
    counters = sim.call(sim.sim.counters.as_dict)["requests"]
    assert counters["get"] == 0 and counters["list"] > 0  # read again by list pages

    # the apply is undone as any run is: previewed (nothing sent), then that preview applied
    sim.call(sim.sim.reset_counters)
    proc = cli(sim, state, "undo", apply_id, "--plan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sim.call(lambda: sim.sim.counters.requests["patch"]) == 0
    preview_id = run_id_of(proc.stdout)
    proc = cli(sim, state, "run", "--plan", preview_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert states(sim) == seen
    assert set(patches(sim)) == set(planned) - set(changed)
    undo_id = run_id_of(proc.stdout)
    assert read_run_info(state / undo_id)["kind"] == "undo"


def test_a_plan_of_another_job_version_age_or_shard_is_refused(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    state, job, proc = plan_job(sim, tmp_path)
    plan_id = run_id_of(proc.stdout)
    sim.call(sim.sim.reset_counters)

    too_old = cli(sim, state, "run", job, "--plan", plan_id, "--plan-max-age", "0s")
    other_shard = cli(sim, state, "run", job, "--plan", plan_id, "--shard", "1/2")
    no_job = cli(sim, state, "run", "--plan", plan_id)
    write_job(tmp_path, {**JOB, "changes": {"set_tags": {"reviewed": "no"}}})
    other_version = cli(sim, state, "run", job, "--plan", plan_id)
    for proc, words in ((too_old, "over --plan-max-age"), (other_shard, "shard"),
                        (no_job, "was made from a job file"),
                        (other_version, "another version")):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert words in proc.stderr and plan_id in proc.stderr
        assert "Traceback" not in proc.stderr
    # the hint names the command as it runs here: with this state folder
    assert shlex.join(["bulk-tagger", "run", "JOB", "--plan", plan_id, "--state-dir",
                       str(state)]) in no_job.stderr
    assert sim.call(sim.sim.counters.total) == 0  # nothing sent, not even a read
    assert [p.name for p in state.iterdir()] == [plan_id]  # no run folder made


def test_undo_of_10000_images_previews_limits_and_reads_by_list_pages(tmp_path: Path) -> None:
    """The demo's first region holds 30% of the images: 10,200 of 34,000. Undoing a run over
    its private ones reads 11 list pages each time, not a GET an image (it was one GET each)."""
    with SimulatorThread(SimConfig(images=34000)) as sim:
        state = tmp_path / "state"
        job = write_job(tmp_path, {
            "name": "big", "targets": [{"query": {"projects": [1337], "regions": [7],
                                                  "visibility": "private"}}],
            "changes": {"set_tags": {"stamp": "x"}},
        })
        proc = cli(sim, state, "run", job)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run_id = run_id_of(proc.stdout)
        updated = summary(state / run_id)["counts"]["updated"]
        assert updated >= 5000
        sim.call(sim.sim.reset_counters)

        # over its limit: exit 3, nothing sent
        for limit in (["--max-changes", "100"], ["--max-changes-percent", "50"]):
            proc = cli(sim, state, "undo", run_id, *limit)
            assert proc.returncode == 3, proc.stdout + proc.stderr
            assert "nothing was sent" in proc.stdout
        # the preview: a plan run of the undo, its diff, no PATCH
        proc = cli(sim, state, "undo", run_id, "--plan")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "tags.stamp" in proc.stdout and "nothing was sent" in proc.stdout
        preview_id = run_id_of(proc.stdout)
        assert read_run_info(state / preview_id)["kind"] == "plan"
        counters = sim.call(sim.sim.counters.as_dict)["requests"]
        assert counters["patch"] == 0
        # each undo read the region by list pages: 11 pages of 1,000, never a GET an image
        assert counters["get"] == 0
        assert counters["list"] == 3 * 11, counters

"""``bulk-tagger undo RUN_ID``: the real CLI in a subprocess against a simulator.

A run that sets, removes and renames tags and sets fields is undone: every image nobody
touched since is exactly as before the run; images changed in between (through the API) are
left alone and reported ``skipped`` / ``conflict``; a change elsewhere on an image does not
stop its undo. Undo has its own run folder, journal and report, and ``undo --resume`` goes on
after an interrupted undo.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import Key, images, key_of, results, summary
from worker.journal import read_run_info
from worker.models import tag_problem
from worker.simulator import SimConfig, SimulatorThread

KEY = "undo-test-key"

JOB: dict[str, Any] = {
    "name": "undo-test",
    "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
    "changes": {
        "set_tags": {"managed-by": "bulk-tagger", "stamped-on": "{run.date}"},
        "remove_tags": ["legacy"],
        "rename_tags": {"team": "owner"},
        "set": {"ssh_key": "allow", "name": "{image.name}-v2"},
    },
    "options": {"concurrency": 8},
}


# -- helpers ----------------------------------------------------------------------------------
def cli(folder: Path, name: str, *args: str | Path, wait: bool = True) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    env["GCORE_API_KEY"] = KEY
    with (folder / f"{name}.out").open("wb") as out, (folder / f"{name}.err").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *map(str, args), "--log-format", "json"],
            stdout=out, stderr=err, env=env,
        )
    if wait:
        proc.wait(120)
    return proc


def said(folder: Path, name: str) -> str:
    return (folder / f"{name}.out").read_text() + (folder / f"{name}.err").read_text()[-3000:]


def runs(state: Path, kind: str) -> list[Path]:
    return sorted(p for p in state.iterdir() if read_run_info(p).get("kind") == kind)


def patch_image(sim: SimulatorThread, key: Key, body: dict[str, Any]) -> None:
    """Someone else changes an image, through the API."""
    p, r, image_id = key
    request = urllib.request.Request(
        f"{sim.url}/cloud/v1/images/{p}/{r}/{image_id}", method="PATCH",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"APIKey {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def journal_value(run_dir: Path, sql: str) -> int:
    """One number read from ``run_dir``'s journal while its run goes on (0 until there is one)."""
    uri = f"{(run_dir / 'journal.sqlite').resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5)
        try:
            row = conn.execute(sql).fetchone()
            return int(row[0] or 0) if row else 0
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def committed_outcomes(run_dir: Path) -> int:
    return journal_value(run_dir, "SELECT COUNT(*) FROM outcomes")


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(images=240)) as thread:
        yield thread


def do_run(tmp_path: Path, sim: SimulatorThread) -> tuple[Path, Path]:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB, sort_keys=False))
    state = tmp_path / "state"
    proc = cli(tmp_path, "run", "run", job, "--base-url", sim.url, "--state-dir", state)
    assert proc.returncode == 0, said(tmp_path, "run")
    (run_dir,) = runs(state, "run")
    return state, run_dir


def undo_args(sim: SimulatorThread, state: Path, run_id: str, *extra: str) -> list[str | Path]:
    return ["undo", run_id, "--base-url", sim.url, "--state-dir", state, *extra]


# -- the tests --------------------------------------------------------------------------------
def test_undo_restores_untouched_images_exactly_and_skips_changed_ones(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    before = images(sim)
    state, run_dir = do_run(tmp_path, sim)
    # the run finished: its journal is compacted, undo reads the run from results.jsonl.gz
    conn = sqlite3.connect(run_dir / "journal.sqlite")
    try:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    finally:
        conn.close()
    assert not {"targets", "outcomes"} & {name for (name,) in tables}
    rows = results(run_dir)
    updated = [r for r in rows if r["status"] == "updated"]
    assert len(updated) > 100
    # the run did every kind of change somewhere
    patches = [r["patch"] for r in updated]
    assert any(v is None for p in patches for v in p.get("tags", {}).values()), "a removal"
    renamed = [r for r in updated if "team" in r["before"]["tags"]
               and r["patch"]["tags"].get("team", "") is None and "owner" in r["patch"]["tags"]]
    assert renamed, "a rename"
    assert any("ssh_key" in p for p in patches) and all(p["name"].endswith("-v2")
                                                        for p in patches)
    after_run = images(sim)

    # between the run and its undo, others change some of the images
    b = key_of(renamed[0])
    f = key_of(next(r for r in updated if "legacy" in r["before"]["tags"] and key_of(r) != b))
    c = key_of(next(r for r in updated if "ssh_key" in r["patch"] and key_of(r) not in (b, f)))
    a, d, e = [k for k in map(key_of, updated) if k not in (b, c, f)][:3]
    patch_image(sim, a, {"tags": {"managed-by": "someone-else"}})  # a tag the run set
    patch_image(sim, b, {"tags": {"team": "platform"}})  # the key the run renamed away, back
    patch_image(sim, c, {"ssh_key": "deny"})  # a field the run set
    patch_image(sim, d, {"name": "renamed-by-hand"})
    patch_image(sim, f, {"tags": {"legacy": "again"}})  # a tag the run removed, back
    patch_image(sim, e, {"tags": {"note": "unrelated"}})  # not what the run set: no conflict
    changed = {a, b, c, d, f}
    between = images(sim)
    sim.call(sim.sim.reset_counters)

    undo = cli(tmp_path, "undo", *undo_args(sim, state, run_dir.name))
    assert undo.returncode == 0, said(tmp_path, "undo")
    (undo_dir,) = runs(state, "undo")
    assert undo_dir != run_dir
    assert undo_dir.name.startswith("undo-test-undo-")
    for name in ("journal.sqlite", "results.jsonl.gz", "summary.json"):
        assert (undo_dir / name).exists()

    final = images(sim)
    for k, image in before.items():
        if k in changed:
            assert final[k] == between[k], "a conflicting image is left as it was found"
        elif k == e:
            note = {**image["tags"], "note": ("unrelated", False)}
            assert final[k] == {**image, "tags": note}
        else:
            assert final[k] == image, f"{k} not restored: {final[k]} != {image}"
    assert after_run != before  # the run did change things, and the undo undid them

    undo_rows = results(undo_dir)
    by_key = {key_of(r): r for r in undo_rows}
    assert len(by_key) == len(undo_rows) == len(updated), "one line per updated target"
    for k in changed:
        assert (by_key[k]["status"], by_key[k]["reason"]) == ("skipped", "conflict")
    assert by_key[e]["status"] == "updated"
    assert all(r["status"] == "updated" for k, r in by_key.items() if k not in changed)
    done = summary(undo_dir)
    assert done["counts"]["skipped"] == len(changed)
    assert done["counts"]["updated"] == len(updated) - len(changed)
    assert done["exit_code"] == 0 and done["parent_run_id"] == run_dir.name
    assert done["job"] == "undo-test"
    # undo sent a PATCH only where it restored something, one each
    counters = sim.call(lambda: dict(sim.sim.counters.patches_per_image))
    assert set(counters) == {k for k in by_key if k not in changed}
    assert set(counters.values()) == {1}
    # the run's own record is untouched by its undo
    assert summary(run_dir)["counts"]["updated"] == len(updated)


def test_undo_resume_goes_on_after_an_interrupted_undo(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    before = images(sim)
    state, run_dir = do_run(tmp_path, sim)
    updated = sum(1 for r in results(run_dir) if r["status"] == "updated")
    sim.call(sim.sim.set_faults, latency_ms=30.0)

    first = cli(tmp_path, "undo1", *undo_args(sim, state, run_dir.name, "--concurrency", "4"),
                wait=False)
    deadline = time.monotonic() + 60
    while not (runs(state, "undo") and committed_outcomes(runs(state, "undo")[0]) > 0):
        assert first.poll() is None, said(tmp_path, "undo1")
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    (undo_dir,) = runs(state, "undo")
    assert read_run_info(undo_dir)["exit_code"] is None, "killed before the undo finished"

    sim.call(sim.sim.set_faults, latency_ms=0.0)
    second = cli(tmp_path, "undo2", *undo_args(sim, state, run_dir.name, "--resume"))
    assert second.returncode == 0, said(tmp_path, "undo2")
    assert runs(state, "undo") == [undo_dir], "the same undo went on"
    assert '"run.resumed"' in (tmp_path / "undo2.err").read_text()
    rows = results(undo_dir)
    assert len(rows) == len({key_of(r) for r in rows}) == updated
    assert summary(undo_dir)["counts"]["planned"] == 0
    assert images(sim) == before



def test_undo_of_an_unknown_run_is_a_usage_error(tmp_path: Path, sim: SimulatorThread) -> None:
    state = tmp_path / "state"
    state.mkdir()
    proc = cli(tmp_path, "undo", *undo_args(sim, state, "no-such-run"))
    assert proc.returncode == 2
    assert "no-such-run" in (tmp_path / "undo.err").read_text()
    assert sim.call(sim.sim.counters.total) == 0


# -- interrupted and resumed, then undone ---------------------------------------------------------
def kill_when(tmp_path: Path, proc: subprocess.Popen[bytes], name: str, run_dir: Path,
              sim: SimulatorThread) -> None:
    """SIGKILL once some outcomes are committed and more PATCHes were applied since."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, said(tmp_path, name)
        assert time.monotonic() < deadline
        done = committed_outcomes(run_dir) if run_dir.exists() else 0
        applied = sim.call(lambda: sum(sim.sim.counters.applied_per_image.values()))
        if done > 0 and applied >= done + 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def test_undo_after_a_killed_and_resumed_run_restores_everything(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A PATCH that landed before the kill, its outcome not yet committed, is recorded
    ``updated`` on resume (read again, it shows the patch), so undo reverts it too."""
    before = images(sim)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "options": {"concurrency": 4}}, sort_keys=False))
    state = tmp_path / "state"
    sim.call(sim.sim.set_faults, latency_ms=40.0)
    args = ["run", job, "--base-url", sim.url, "--state-dir", state, "--run-id", "r1"]
    first = cli(tmp_path, "run1", *args, wait=False)
    kill_when(tmp_path, first, "run1", state / "r1", sim)
    sim.call(sim.sim.set_faults, latency_ms=0.0)
    resumed = cli(tmp_path, "run2", *args, "--resume")
    assert resumed.returncode == 0, said(tmp_path, "run2")
    undo = cli(tmp_path, "undo", *undo_args(sim, state, "r1"))
    assert undo.returncode == 0, said(tmp_path, "undo")
    final = images(sim)
    wrong = [k for k in before if final[k] != before[k]]
    assert not wrong, f"{len(wrong)} images not restored"


def test_a_resumed_undo_still_skips_images_changed_since(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """An undo target read again on resume is checked against what the run set
    (``Pending.expect``): a change made since the undo's plan is a conflict, not overwritten."""
    state, run_dir = do_run(tmp_path, sim)
    sim.call(sim.sim.set_faults, latency_ms=40.0)
    sim.call(sim.sim.reset_counters)
    first = cli(tmp_path, "undo1", *undo_args(sim, state, run_dir.name, "--run-id", "u1",
                                              "--concurrency", "4"), wait=False)
    kill_when(tmp_path, first, "undo1", state / "u1", sim)
    sim.call(sim.sim.set_faults, latency_ms=0.0)
    undone = sim.call(lambda: set(sim.sim.counters.applied_per_image))
    pending = next(key_of(r) for r in results(run_dir)
                   if r["status"] == "updated" and key_of(r) not in undone)
    patch_image(sim, pending, {"tags": {"managed-by": "someone-else"}})
    between = images(sim)[pending]
    second = cli(tmp_path, "undo2", *undo_args(sim, state, run_dir.name, "--resume"))
    assert second.returncode == 0, said(tmp_path, "undo2")
    assert images(sim)[pending] == between, "a change made since must be left alone"
    row = next(r for r in results(state / "u1") if key_of(r) == pending)
    assert (row["status"], row["reason"]) == ("skipped", "conflict")


# -- values that look like templates: restored as they were ------------------------------------
# Tag values and names that hold braces, escapes, placeholders and unicode. Undo restores them as
# literal text (Changes.literal): never rendered, not when first planned, not when replayed from
# the journal on resume, not when planned again after a task lock.
TRICKY = ["{", "}", "{{", "}}", "a{b}", "{{x}}", "}{", "{image.name}", "{tags.team}",
          "{run.id}", "{{run.date}}", "{image.nmae}", "é{ü}", "日本{", "🙂}}"]  # fmt: skip
_ALPHABET = st.sampled_from([*"ab.:-_$é日🙂", "{", "}", "{{", "}}", "{image.name}", "{run.id}"])
tag_texts = st.one_of(
    st.sampled_from(TRICKY), st.lists(_ALPHABET, min_size=1, max_size=6).map("".join)
).filter(lambda text: tag_problem(text) is None)


def escaped(text: str) -> str:
    """``text`` as a template that renders it exactly."""
    return text.replace("{", "{{").replace("}", "}}")


@st.composite
def literal_cases(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Images (name and tags) and a job's changes, all full of braces."""
    found = []
    for _ in range(6):
        tags = draw(st.dictionaries(st.sampled_from(["v", "w", "team", "legacy", "keep"]),
                                    tag_texts, min_size=1, max_size=5))
        found.append({"name": draw(tag_texts), "tags": tags})
    changes = {
        "set_tags": {"v": escaped(draw(tag_texts)), "w": "{image.name}-{{w}}"},
        "remove_tags": ["legacy"],
        "rename_tags": {"team": "owner"},
        "set": {"name": escaped(draw(tag_texts)) + "-v2"},
    }
    return found, changes


def wait_for(proc: subprocess.Popen[bytes], check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert proc.poll() is None, f"{what}: the process ended ({proc.returncode})"
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(case=(
    [{"name": "{image.name}", "tags": {"v": "a{b}", "team": "{{x}}", "legacy": "}{"}},
     {"name": "n{{", "tags": {"v": "{run.id}", "w": "é{ü}", "keep": "{tags.team}"}},
     {"name": "日本}}", "tags": {"team": "{image.nmae}", "v": "{{run.date}}"}},
     {"name": "{", "tags": {"legacy": "{", "w": "}"}},
     {"name": "}", "tags": {"v": "🙂}}", "w": "{{"}},
     {"name": "plain", "tags": {"v": "{tags.v}", "team": "t"}}],
    {"set_tags": {"v": "new", "w": "{image.name}-{{w}}"}, "remove_tags": ["legacy"],
     "rename_tags": {"team": "owner"}, "set": {"name": "x{{y}}-v2"}},
))  # fmt: skip
@given(case=literal_cases())
def test_property_undo_restores_brace_values_exactly_through_kill_resume_and_locks(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[list[dict[str, Any]], dict[str, Any]],
) -> None:
    """Run, then undo: every image is exactly as before. The undo meets task locks: two images
    locked until its plan is done (it waits, reads them again and plans again from the
    changes it holds), two locked until after it is SIGKILLed (the resumed undo replays their
    changes from the journal, reads them free and plans again)."""
    found, changes = case
    tmp = tmp_path_factory.mktemp("literal")
    with SimulatorThread(SimConfig(images=0)) as sim:
        for image in found:
            sim.call(sim.sim.add_image, 1337, 7, name=image["name"], tags=image["tags"])
        before = images(sim)
        job = tmp / "job.yaml"
        job.write_text(yaml.safe_dump({
            "name": "literal-test", "changes": changes,
            "targets": [{"query": {"projects": [1337], "regions": [7]}}],
        }, sort_keys=False))  # fmt: skip
        state = tmp / "state"
        run = cli(tmp, "run", "run", job, "--base-url", sim.url, "--state-dir", state,
                  "--run-id", "r1")
        assert run.returncode == 0, said(tmp, "run")
        updated = [key_of(r) for r in results(state / "r1") if r["status"] == "updated"]
        assert len(updated) == len(found), results(state / "r1")
        assert images(sim) != before

        now_tasks = [sim.call(sim.sim.lock_image, *k, None) for k in updated[:2]]
        later_tasks = [sim.call(sim.sim.lock_image, *k, None) for k in updated[2:4]]
        u1 = state / "u1"
        first = cli(tmp, "undo1", *undo_args(sim, state, "r1", "--run-id", "u1",
                                             "--lock-poll-seconds", "0.05"), wait=False)
        try:
            wait_for(first, lambda: journal_value(u1, "SELECT plan_done FROM run") == 1,
                     "the undo's plan is committed")
            for task in now_tasks:
                sim.call(sim.sim.end_task, task)
            wait_for(first, lambda: committed_outcomes(u1) == len(found) - 2,
                     "every image but the two still locked is undone")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        assert read_run_info(u1)["exit_code"] is None
        for task in later_tasks:
            sim.call(sim.sim.end_task, task)

        second = cli(tmp, "undo2", *undo_args(sim, state, "r1", "--resume",
                                              "--lock-poll-seconds", "0.05"))
        assert second.returncode == 0, said(tmp, "undo2")
        final = images(sim)
        wrong = {k: (final[k], image) for k, image in before.items() if final[k] != image}
        assert not wrong, wrong
        rows = {key_of(r): r for r in results(u1)}
        assert all(r["status"] == "updated" for r in rows.values()), rows
        for k in updated[:2]:
            assert rows[k]["lock_wait_s"] > 0, rows[k]
        # their tasks ended before the resume: its read (a list page) found them free, so it
        # planned them again at once, without waiting on the tasks its journal named
        for k in updated[2:4]:
            assert rows[k]["lock_wait_s"] == 0, rows[k]

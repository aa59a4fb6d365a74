"""What the worker trusts on its own machine, each door tried through the real CLI
(README: threat model):

- run ids are one path segment of a safe alphabet: ``../x``, an absolute path, ``.``, ``..``,
  ``""``, ``a/b``, 200 characters, an ESC are exit 2 naming the rule, nothing written
  elsewhere; ``report`` and ``undo`` refuse them too;
- the state folder: a world-writable one is refused; a run folder that is a symlink, a
  dangling ``journal.sqlite`` symlink, a run planted by another user are refused (exit 2) or
  skipped by ``--resume``, never written through; ``stage.sqlite`` is 0600;
- the key: one with a newline is exit 2 at start; a key file that is a FIFO or /dev/zero is
  refused at once; an unusable path is exit 2 with a plain message, never 70.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from tests.helpers import run_cli, write_job
from worker.cli import main
from worker.selectors import _Stage

JOB = {
    "name": "trust",
    "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
    "changes": {"set_tags": {"checked": "yes"}},
}
SIM = ("--simulate", "--simulate-images", "12")


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return write_job(tmp_path, JOB)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- door 2: run ids ----------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../x", "ABSOLUTE", ".", "..", "", "a/b", "x" * 200,
                                    "esc\x1b[2Jid"])
def test_a_run_id_is_one_safe_path_segment(tmp_path: Path, job: Path, run_id: str) -> None:
    state = tmp_path / "state" / "inner"
    state.mkdir(parents=True)
    absolute = tmp_path / "abs-run"
    run_id = str(absolute) if run_id == "ABSOLUTE" else run_id
    before = {p: _mode(p) for p in (tmp_path, tmp_path / "state", state)}
    plan = run_cli("plan", job, *SIM, "--state-dir", state, "--run-id", run_id)
    assert plan.returncode == 2, plan.stderr
    assert "is not a run id" in plan.stderr and "1 to 128 characters" in plan.stderr
    assert "\x1b" not in plan.stderr  # shown escaped
    assert list(state.iterdir()) == []
    assert not (tmp_path / "state" / "x").exists() and not absolute.exists()
    assert {p: _mode(p) for p in before} == before  # nothing chmodded
    if run_id not in ("../x", "..", "", "esc\x1b[2Jid"):
        return  # report and undo take the same check: a few of the ids suffice
    for command in (("report", run_id), ("undo", run_id, "--base-url", "http://127.0.0.1:9")):
        refused = run_cli(*command, "--state-dir", state)
        assert refused.returncode == 2, refused.stderr
        assert "RUN_ID" in refused.stderr and "is not a run id" in refused.stderr


# -- door 3: the state folder -------------------------------------------------------------------
def test_a_world_writable_state_folder_is_refused(tmp_path: Path, job: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o1777)
    refused = run_cli("run", job, *SIM, "--state-dir", state)
    assert refused.returncode == 2, refused.stderr
    assert "writable by every user" in refused.stderr
    assert list(state.iterdir()) == []


def test_symlinks_in_the_state_folder_are_not_followed(tmp_path: Path, job: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (state / "linked").symlink_to(elsewhere)
    refused = run_cli("run", job, *SIM, "--state-dir", state, "--run-id", "linked")
    assert refused.returncode == 2, refused.stderr
    assert "is a symlink" in refused.stderr
    assert list(elsewhere.iterdir()) == [] and _mode(elsewhere) == 0o755

    # a dangling journal symlink inside a run folder of ours: its target is never created
    (state / "dangling").mkdir(mode=0o700)
    target = tmp_path / "planted.sqlite"
    (state / "dangling" / "journal.sqlite").symlink_to(target)
    refused = run_cli("run", job, *SIM, "--state-dir", state, "--run-id", "dangling")
    assert refused.returncode == 2, refused.stderr
    assert "is a symlink" in refused.stderr
    assert not target.exists()
    report = run_cli("report", "linked", "--state-dir", state)
    assert report.returncode == 2 and "is a symlink" in report.stderr


def test_a_run_planted_by_another_user_is_never_resumed(tmp_path: Path, job: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    state = tmp_path / "state"
    first = run_cli("plan", job, *SIM, "--state-dir", state, "--run-id", "planted")
    assert first.returncode == 0, first.stderr
    planted = state / "planted"
    # make it look unfinished (resumable), and another user's
    conn = sqlite3.connect(planted / "journal.sqlite")
    conn.execute("UPDATE run SET kind='run', exit_code=NULL, finished_at=NULL")
    conn.commit()
    conn.close()
    for path in [planted, *planted.iterdir()]:
        os.chown(path, 12345, 12345, follow_symlinks=False)
    planted_bytes = (planted / "journal.sqlite").read_bytes()

    named = run_cli("run", job, *SIM, "--state-dir", state, "--resume", "--run-id", "planted")
    assert named.returncode == 2, named.stderr
    assert "belongs to user 12345" in named.stderr
    found = run_cli("run", job, *SIM, "--state-dir", state, "--resume")
    assert found.returncode == 0, found.stderr  # a new run of its own: the planted one skipped
    assert "run.resumed" not in found.stderr
    assert len([p for p in state.iterdir() if p.is_dir()]) == 2
    assert (planted / "journal.sqlite").read_bytes() == planted_bytes
    report = run_cli("report", "planted", "--state-dir", state)
    assert report.returncode == 2 and "belongs to user 12345" in report.stderr


def test_the_staging_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        stage = _Stage(tmp_path / "stage.sqlite")
    finally:
        os.umask(old)
    try:
        assert _mode(tmp_path / "stage.sqlite") == 0o600
    finally:
        stage.close()


# -- door 8: the key, and paths that cannot be used ---------------------------------------------
def test_a_key_with_a_newline_is_refused_at_start(tmp_path: Path, job: Path) -> None:
    refused = run_cli("run", job, "--base-url", "http://127.0.0.1:9", "--state-dir",
                      tmp_path / "state", env={"GCORE_API_KEY": "sk-part1\nsk-part2"})
    assert refused.returncode == 2, refused.stderr
    assert "GCORE_API_KEY" in refused.stderr and "control character" in refused.stderr
    assert "sk-part" not in refused.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "proc-environ"])
def test_a_key_file_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, job: Path, kind: str
) -> None:
    key = tmp_path / "key"
    if kind == "fifo":
        os.mkfifo(key)
    else:
        key.symlink_to("/dev/zero" if kind == "dev-zero" else "/proc/self/environ")
    refused = run_cli("run", job, "--base-url", "http://127.0.0.1:9", "--state-dir",
                      tmp_path / "state", "--api-key-file", key, timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert "--api-key-file" in refused.stderr
    assert ("not a regular file" if kind == "fifo" else "under /proc, /sys or /dev") \
        in refused.stderr


def test_an_unusable_state_path_is_a_plain_exit_2(tmp_path: Path, job: Path) -> None:
    too_long = tmp_path / ("d" * 300)
    refused = run_cli("plan", job, *SIM, "--state-dir", too_long)
    assert refused.returncode == 2, refused.stderr
    assert "File name too long" in refused.stderr and "internal error" not in refused.stderr
    a_file = tmp_path / "file"
    a_file.write_text("")
    refused = run_cli("plan", job, *SIM, "--state-dir", a_file / "state")
    assert refused.returncode == 2, refused.stderr
    assert "Not a directory" in refused.stderr and "internal error" not in refused.stderr


# -- door 4 and door 8: the job file ------------------------------------------------------------
BOMB = "".join(
    [f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]\n"
     for i in range(1, 9)]
)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    text = ('name: bomb\nx: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
            + BOMB.replace("a: &a", "a1: &a", 1)
            + "targets: [{query: {projects: [1], regions: [7]}}]\n"
            "changes: {set_tags: {a: b}}\noptions: {on_read_only: *h}\n")
    assert len(text) < 700
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    refused = run_cli("validate", path, timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert "expands to more than 100,000 values" in refused.stderr
    assert len(refused.stderr) < 500


def test_a_job_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, {**JOB, "description": "x" * (1 << 20)})
    refused = run_cli("validate", path)
    assert refused.returncode == 2, refused.stderr
    assert "over 1,048,576 bytes" in refused.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_job_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "job.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    refused = run_cli("validate", path, timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert ("not a regular file" if kind == "fifo" else "under /proc, /sys or /dev") \
        in refused.stderr


# -- door 6 in a selector file: ids that would not stay one path segment ----------------------
@pytest.mark.parametrize("image_id", ["..", ".", "a/b", "x?y"])
def test_a_selector_file_id_that_is_no_path_segment_is_refused(
    tmp_path: Path, image_id: str
) -> None:
    (tmp_path / "rows.csv").write_text(f"project_id,region_id,image_id\n1,7,{image_id}\n")
    path = write_job(tmp_path, {**JOB, "targets": [{"file": "rows.csv"}]})
    refused = run_cli("validate", path)
    assert refused.returncode == 2, refused.stderr
    assert "rows.csv:2: image_id:" in refused.stderr and "is not an image ID" in refused.stderr


def test_a_nul_in_an_argument_is_a_plain_exit_2(
    tmp_path: Path, job: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # argv cannot carry a NUL across exec: the CLI's own entry point is called in-process
    with pytest.raises(SystemExit) as ended:
        main(["plan", str(job), *SIM, "--state-dir", f"{tmp_path}/st\0ate"])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "NUL character" in err and "internal error" not in err


# -- door 1 and door 7: what an error shows of a selector file's own text ---------------------
def test_an_error_shows_a_short_escaped_excerpt_of_a_file_s_text(tmp_path: Path) -> None:
    secret = "sk-0123456789abcdef0123456789abcdef"
    (tmp_path / "esc.csv").write_text("image_id,\x1b]8;;http://x.invalid\x07x\n")
    (tmp_path / "key.json").write_text(f'[{{"image_id": "img-1", "{secret}": 1}}]')
    for name in ("esc.csv", "key.json"):
        path = write_job(tmp_path, {**JOB, "targets": [{"file": name}]})
        refused = run_cli("validate", path)
        assert refused.returncode == 2, refused.stderr
        assert f"{name}:1:" in refused.stderr and "unknown" in refused.stderr
        assert "\x1b" not in refused.stderr and "\x07" not in refused.stderr
        assert secret[16:] not in refused.stderr, refused.stderr

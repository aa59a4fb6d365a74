"""Failing loudly and early, through the real CLI: a wrong base URL, an API that does not
answer, a project or region that does not exist, a selector that matches nothing, and what
the run says while it retries.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli, run_dirs, summary, write_job
from worker.simulator import Faults, SimConfig, SimulatorThread

#: the issue's own bound on a command against an API that is not there (generous: it is a
#: check that nothing waits for a retry budget, not a speed test)
QUICK_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _job(folder: Path, *queries: dict[str, Any], **options: Any) -> Path:
    return write_job(folder, {
        "name": "fail-early",
        "targets": [{"query": q} for q in queries],
        "changes": {"set_tags": {"stamp": "x"}},
        "options": options,
    })


ALL = {"projects": "all", "regions": "all", "visibility": "private"}


def _no_run(state_dir: Path) -> bool:
    return not state_dir.exists() or not any(p.is_dir() for p in state_dir.iterdir())


def _requests(st: SimulatorThread) -> dict[str, int]:
    return dict(st.call(st.sim.counters.as_dict)["requests"])


def _timed(*args: str | Path) -> tuple[Any, float]:
    started = time.monotonic()
    proc = run_cli(*args, timeout=60)
    return proc, time.monotonic() - started


def test_nothing_listening_ends_in_seconds_naming_the_cause(tmp_path: Path) -> None:
    port = _free_port()
    job = _job(tmp_path, ALL)
    for command in ("plan", "run"):
        proc, took = _timed(command, job, "--base-url", f"http://127.0.0.1:{port}",
                            "--state-dir", tmp_path / "s", "--log-format", "json")
        assert proc.returncode == 75, proc.stderr
        assert took < QUICK_S, took
        assert f"connection refused by 127.0.0.1:{port}" in proc.stderr
        assert "Traceback" not in proc.stderr
        events = [json.loads(line)["event"] for line in proc.stderr.splitlines()
                  if line.startswith("{")]
        assert "run.api_unreachable" in events and "run.started" not in events
    assert _no_run(tmp_path / "s")  # nothing written: there is no run to resume


def test_a_host_that_does_not_resolve_ends_at_once(tmp_path: Path) -> None:
    proc, took = _timed("plan", _job(tmp_path, ALL), "--base-url",
                        "https://bulk-tagger-test.invalid", "--state-dir", tmp_path / "s")
    assert took < QUICK_S, took
    assert "cannot resolve host bulk-tagger-test.invalid" in proc.stderr, proc.stderr
    # a name that does not exist is a wrong base URL (2); a resolver that could not say is
    # worth a retry (75)
    assert proc.returncode == (75 if "emporary" in proc.stderr else 2), proc.stderr


def test_a_base_url_with_an_extra_path_is_exit_2_naming_it(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    proc, took = _timed("run", _job(tmp_path, ALL), "--base-url", sim_thread.url + "/cloud",
                        "--state-dir", tmp_path / "s")
    assert proc.returncode == 2, proc.stderr
    assert took < QUICK_S
    assert "--base-url" in proc.stderr and "404" in proc.stderr
    assert "/cloud/cloud/v1/regions" in proc.stderr
    sent = _requests(sim_thread)
    assert sent["other"] == 1 and sent["list"] == sent["patch"] == 0  # the probe alone
    assert _no_run(tmp_path / "s")


def test_tls_spoken_to_a_plain_http_port_is_exit_2(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    url = sim_thread.url.replace("http://", "https://")
    proc, took = _timed("plan", _job(tmp_path, ALL), "--base-url", url,
                        "--state-dir", tmp_path / "s")
    assert proc.returncode == 2, proc.stderr
    assert took < QUICK_S
    assert "TLS handshake" in proc.stderr and "--base-url" in proc.stderr


def test_a_project_or_region_the_job_names_that_does_not_exist_is_exit_2(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    job = _job(tmp_path, {"projects": [1337], "regions": [99]},
               {"projects": [424242, 1337], "regions": "all"})
    for command in ("plan", "run"):
        proc = run_cli(command, job, "--base-url", sim_thread.url, "--state-dir", tmp_path / "s")
        assert proc.returncode == 2, proc.stderr
        assert "targets[0].query.regions: region 99 not found" in proc.stderr
        assert "targets[1].query.projects: project 424242 not found" in proc.stderr
        assert str(job) in proc.stderr
    sent = _requests(sim_thread)
    assert sent["list"] == sent["get"] == sent["patch"] == 0, sent
    assert sent["regions"] == 2 and sent["projects"] == 2  # the probe, the check: per command
    assert _no_run(tmp_path / "s")


def test_require_matches_fails_a_selector_that_matches_nothing(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    nothing = {**ALL, "name_glob": "no-image-is-named-like-this-*"}
    job = _job(tmp_path, nothing, ALL)
    base = ("--base-url", sim_thread.url, "--state-dir", tmp_path / "s")
    # by default a selector matching nothing is no error, but the summary says so
    proc = run_cli("plan", job, *base)
    assert proc.returncode == 0, proc.stderr
    (plan_dir,) = run_dirs(tmp_path / "s")
    matched = summary(plan_dir)["matched"]
    assert matched["query 1"] == 0 and matched["query 2"] > 0
    assert "query 1" in proc.stdout and "matched" in proc.stdout.lower()
    # the flag (plan and run) and the job option refuse it before any PATCH
    for command, flag in (("plan", "--require-matches"), ("run", "--require-matches")):
        proc = run_cli(command, job, *base, flag)
        assert proc.returncode == 3, proc.stderr
        assert "query 1 matched no image" in proc.stdout
    proc = run_cli("run", _job(tmp_path, nothing, ALL, require_matches=True), *base)
    assert proc.returncode == 3, proc.stderr
    assert _requests(sim_thread)["patch"] == 0


def test_require_matches_in_a_shard_counts_what_other_shards_own(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    # one image by its unique name, another by a row: in 4 shards, 3 own neither, yet each
    # selector matched; only a selector matching nothing in any shard stops a shard (exit 3)
    images = sim_thread.call(sim_thread.sim.images)
    named, listed = images[0], images[1]
    rows = tmp_path / "rows.csv"
    rows.write_text(f"project_id,region_id,image_id\n{listed['project_id']},"
                    f"{listed['region_id']},{listed['id']}\n")
    job = write_job(tmp_path, {
        "name": "sharded", "changes": {"set_tags": {"stamp": "x"}},
        "targets": [{"query": {**ALL, "name_glob": named["name"]}}, {"file": str(rows)}],
    })
    nothing = write_job(tmp_path, {
        "name": "nothing", "changes": {"set_tags": {"stamp": "x"}},
        "targets": [{"query": {**ALL, "name_glob": "no-image-is-named-like-this-*"}}],
    }, name="nothing.yaml")
    base = ("--base-url", sim_thread.url, "--state-dir", tmp_path / "s", "--require-matches")
    planned = 0
    for i in range(4):
        proc = run_cli("plan", job, *base, "--shard", f"{i}/4")
        assert proc.returncode == 0, (i, proc.stdout[-2000:], proc.stderr[-2000:])
        assert run_cli("plan", nothing, *base, "--shard", f"{i}/4").returncode == 3
    for run_dir in run_dirs(tmp_path / "s"):
        if summary(run_dir).get("exit_code") == 0:
            planned += sum(summary(run_dir)["matched"].values())
    assert planned == 2  # each image in the one shard that owns it
    assert _requests(sim_thread)["patch"] == 0


def test_retries_are_said_at_info_a_line_every_few_seconds(tmp_path: Path) -> None:
    # every read answers 503 (the probe lets that pass: the API is there): the projects list
    # is retried until the job's short budget is spent, then the run ends 75
    faults = Faults(p_5xx=1.0, methods=frozenset({"GET"}))
    with SimulatorThread(SimConfig(images=30, faults=faults)) as st:
        job = _job(tmp_path, {"projects": [1337], "regions": "all"}, retry_budget_seconds=3)
        proc, took = _timed("plan", job, "--base-url", st.url, "--state-dir", tmp_path / "s",
                            "--log-format", "json", "--retry-base-seconds", "0.02",
                            "--retry-max-wait-seconds", "0.05")
        sent = _requests(st)
    assert proc.returncode == 75, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    said = [e for e in lines if e["event"] == "api.retrying"]
    assert said, proc.stderr[-2000:]
    assert all(e["level"] == "info" for e in said)
    assert said[0]["status"] == 503 and said[0]["error"] == "Transient"
    assert sent["projects"] >= 10  # many retries, ...
    assert len(said) <= took / 5 + 1  # ... said at most once every five seconds
    assert any(e["event"] == "run.api_unreachable" for e in lines)


@pytest.mark.parametrize("env", [{"JOB_COMPLETION_INDEX": "1"}, {"BULK_TAGGER_SHARDS": "3"}])
def test_half_a_shard_setting_is_exit_2(tmp_path: Path, env: dict[str, str]) -> None:
    proc = run_cli("plan", _job(tmp_path, ALL), "--simulate", "--state-dir", tmp_path / "s",
                   env=env)
    assert proc.returncode == 2, proc.stderr
    assert "JOB_COMPLETION_INDEX" in proc.stderr and "BULK_TAGGER_SHARDS" in proc.stderr
    assert _no_run(tmp_path / "s")


# -- selector files that mean something else -----------------------------------------------------
def _with_two_tags(st: SimulatorThread) -> tuple[dict[str, Any], str]:
    """An image holding tags env and legacy, and its CSV cells project,region,image."""
    image = next(i for i in st.call(st.sim.images)
                 if {"env", "legacy"} <= {t["key"] for t in i["tags"] if not t["read_only"]})
    return image, f"{image['project_id']},{image['region_id']},{image['id']}"


def _rows_job(folder: Path, csv_text: str) -> Path:
    (folder / "rows.csv").write_text(csv_text)
    return write_job(folder, {"name": "rows", "targets": [{"file": "rows.csv"}]})


def test_remove_tags_takes_commas_as_well_as_semicolons(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    image, where = _with_two_tags(sim_thread)
    csv_text = f'project_id,region_id,image_id,remove_tags\n{where},"legacy,env"\n'
    job = _rows_job(tmp_path, csv_text)
    proc = run_cli("run", job, "--base-url", sim_thread.url, "--state-dir", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    after = next(i for i in sim_thread.call(sim_thread.sim.images) if i["id"] == image["id"])
    assert not {"env", "legacy"} & {t["key"] for t in after["tags"]}
    assert _requests(sim_thread)["patch"] == 1


def test_one_image_in_two_rows_that_disagree_is_exit_2_naming_both_lines(
    sim_thread: SimulatorThread, tmp_path: Path
) -> None:
    image, where = _with_two_tags(sim_thread)
    agree = f"project_id,region_id,image_id,tag:owner\n{where},ana\n{where},ana\n"
    proc = run_cli("run", _rows_job(tmp_path, agree), "--base-url", sim_thread.url,
                   "--state-dir", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr  # the same values twice: no contradiction
    patches = _requests(sim_thread)["patch"]
    disagree = f"project_id,region_id,image_id,tag:owner\n{where},ana\n{where},bob\n"
    job = _rows_job(tmp_path, disagree)
    for proc in (run_cli("validate", job),
                 run_cli("run", job, "--base-url", sim_thread.url, "--state-dir", tmp_path / "s")):
        assert proc.returncode == 2, proc.stderr
        assert "rows.csv:3" in proc.stderr and "rows.csv:2" in proc.stderr
        assert f"image {image['id']} is named again" in proc.stderr
        assert "'bob', not 'ana'" in proc.stderr
    assert _requests(sim_thread)["patch"] == patches  # nothing sent


# -- validate names every mistake ---------------------------------------------------------------
def test_validate_names_every_mistake_of_the_job_and_of_each_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "name: Bad_Name\n"
        "targets:\n"
        "  - query: {projects: [0], regions: all, visibility: secret}\n"
        "changes:\n"
        "  set_tags: {a: b}\n"
        "  set: {ssh_key: sometimes}\n"
        "options:\n"
        "  concurrency: 0\n"
    )
    proc = run_cli("validate", tmp_path / "bad.yaml")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    for where in ("bad.yaml:1: name", "bad.yaml:3: targets[0].query.projects[0]",
                  "bad.yaml:3: targets[0].query.visibility", "bad.yaml:6: changes.set.ssh_key",
                  "bad.yaml:8: options.concurrency"):
        assert sum(where in line for line in lines) == 1, (where, lines)
    assert len(lines) == 5
    # a selector file: the first 20 rows in error are named, the rest counted
    rows = ["project_id,region_id,image_id,tag:owner"]
    rows += [f"1337,7,{'bad id' if i % 2 else f'ok-{i}'},x" for i in range(90)]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "more.jsonl").write_text('{"image_id": "ok"}\n{"image_id": 5}\n')
    job = write_job(tmp_path, {"name": "rows", "targets": [{"file": "rows.csv"},
                                                           {"file": "more.jsonl"}],
                               "changes": {"set_tags": {"a": "b"}}})
    proc = run_cli("validate", job, env={"GCORE_CLOUD_PROJECT_ID": "1337",
                                         "GCORE_CLOUD_REGION_ID": "7"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    named = [line for line in lines if "rows.csv:" in line]
    assert len(named) == 20 and named[0].startswith("error: "), named
    assert "rows.csv:3: image_id" in named[0] and "rows.csv:41: image_id" in named[-1]
    assert "more.jsonl:2: image_id" in proc.stderr  # the next file is read too
    assert lines[-1] == "error: ... and 25 more mistakes"
    # plan and run still stop at the first, on one line
    proc = run_cli("plan", job, "--simulate", "--state-dir", tmp_path / "s")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- progress while planning -------------------------------------------------------------------
def test_planning_says_how_far_it_is_while_it_lists(tmp_path: Path) -> None:
    # 40 list pages, 30 ms each, four at a time: a plan of about half a second, logged every
    # 0.1 s (the hidden knob; pods get a line every 5 s)
    faults = Faults(latency_ms=30.0, methods=frozenset({"GET"}))
    with SimulatorThread(SimConfig(images=2000, faults=faults)) as st:
        job = _job(tmp_path, ALL, page_size=25)
        proc = run_cli("plan", job, "--base-url", st.url, "--state-dir", tmp_path / "s",
                       "--log-format", "json", "--progress-seconds", "0.1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    said = [e for e in lines if e["event"] == "run.planning"]
    assert len(said) >= 3, [e["event"] for e in lines]  # while it lists, not only at the end
    first, last = said[0], said[-1]
    assert first["done"] < last["done"] and first["pages"] < last["pages"]
    assert all(e["level"] == "info" and e["rate"] >= 0 for e in said)
    assert last["total"] == last["done"] > 0 and last["eta_s"] is not None
    assert any(e["eta_s"] is not None and e["total"] for e in said[:-1])  # counts known: ETA

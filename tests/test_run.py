"""``bulk-tagger run`` end to end: the real CLI in a subprocess against a ``SimulatorThread``
(its own loop, in this process), every fault the simulator has, locks, signals and rates.

Waits are shortened by the CLI's hidden knobs (``--retry-base-seconds``,
``--retry-max-wait-seconds``, ``--lock-poll-seconds``) so each run takes seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import Key, key_of, results, state_of, summary
from worker.models import Changes, Image, RunContext
from worker.plan import apply_patch, plan_changes
from worker.simulator import Faults, SimConfig, SimulatorThread

CLI = [sys.executable, "-m", "worker", "run"]
KEY = "run-test-key-8c2f41"
FAST = ["--retry-base-seconds", "0.02", "--retry-max-wait-seconds", "0.2",
        "--lock-poll-seconds", "0.05"]  # fmt: skip


CHANGES = Changes(set_tags={"managed-by": "bulk-tagger", "run": "{run.id}"},
                  remove_tags=("legacy",), rename_tags={"team": "owner"},
                  set_fields={"ssh_key": "allow"})


def will_change(image: dict[str, Any], extra_tags: dict[str, str]) -> bool:
    """Whether the job plans a change for ``image`` (as it is, or with ``extra_tags``)."""
    ctx = RunContext(run_id="any", run_date="2026-01-01")
    parsed = Image.from_api(image)
    if plan_changes(parsed, CHANGES, ctx).patch is None:
        return False
    parsed.tags.update(extra_tags)
    return plan_changes(parsed, CHANGES, ctx).patch is not None


def write_job(folder: Path, **options: Any) -> Path:
    job = {
        "name": "executor-test",
        "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private"}}],
        "changes": {
            "set_tags": dict(CHANGES.set_tags),
            "remove_tags": list(CHANGES.remove_tags),
            "rename_tags": dict(CHANGES.rename_tags),
            "set": dict(CHANGES.set_fields),
        },
        "options": {"concurrency": 16, "max_changes": 100_000, **options},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def cli_args(job: Path, st: SimulatorThread, state_dir: Path, *extra: str) -> list[str]:
    return [*CLI, str(job), "--base-url", st.url, "--state-dir", str(state_dir),
            "--log-format", "json", *extra]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_TAGGER_"))}
    out["GCORE_API_KEY"] = KEY
    return out


def run_cli(args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def only_run(state_dir: Path) -> Path:
    runs = [p for p in state_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def one_per_target(rows: list[dict[str, Any]], expected: set[Key]) -> dict[Key, dict[str, Any]]:
    """Every target exactly once: the rows as a map by key."""
    keys = [(r["project_id"], r["region_id"], r["image_id"]) for r in rows]
    assert len(keys) == len(set(keys)), "a target has more than one line"
    assert set(keys) == expected
    return dict(zip(keys, rows, strict=True))


class Watcher:
    """A thread that reads the simulator's counters while the CLI runs and fires ``events``:
    ``(patches_seen, action)`` pairs, each run once the simulator has seen that many PATCHes.
    Keeps ``samples``: (monotonic time, PATCH requests, 2xx answers, 429 answers)."""

    def __init__(self, st: SimulatorThread, events: list[tuple[int, Callable[[], None]]]) -> None:
        self.st = st
        self.events = sorted(events, key=lambda e: e[0])
        self.samples: list[tuple[float, int, int, int]] = []
        self.errors: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _counts(self) -> tuple[int, int, int]:
        c = self.st.sim.counters
        return c.requests["patch"], c.statuses[200], c.rate_limited

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                patches, ok, limited = self.st.call(self._counts)
                self.samples.append((time.monotonic(), patches, ok, limited))
                while self.events and patches >= self.events[0][0]:
                    self.events.pop(0)[1]()
                self._done.wait(0.02)
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10)
        assert not self.errors, self.errors


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


# -- 1. everything at once ---------------------------------------------------------------------
def test_a_run_through_every_fault_ends_every_target_once_and_as_planned(
    tmp_path: Path, state_dir: Path
) -> None:
    faults = Faults(seed=7, p_429=0.01, retry_after="seconds", retry_after_s=0.3, p_5xx=0.02,
                    p_drop_before=0.01, p_drop_after=0.01, latency_ms=1.0,
                    latency_jitter_ms=1.0)
    with SimulatorThread(SimConfig(images=3000, seed=7, faults=faults)) as st:
        sim = st.sim
        images = st.call(sim.images)
        private = [key_of(i) for i in images if i["visibility"] == "private"]
        # images the job changes even after a task renamed-to-be tag lands on them
        changing = [key_of(i) for i in images if i["visibility"] == "private"
                    and will_change(i, {"team": "locked-team"})]
        # task locks before the run, that the plan phase sees: some end while the apply
        # phase runs (one applying tags, one in ERROR), one never does
        ends, never = changing[10:13], changing[20]
        task_tags = {"team": "locked-team"}
        st.call(sim.lock_image, *ends[0], 4.0, set_tags=task_tags)
        st.call(sim.lock_image, *ends[1], 4.5, end_state="ERROR")
        st.call(sim.lock_image, *ends[2], 5.0)
        never_task = st.call(sim.lock_image, *never, None)
        snapshot = {key_of(i): state_of(i) for i in images}
        snapshot[ends[0]]["tags"].update(task_tags)  # what the task will have left

        def lock_unsent() -> None:
            # mid-run locks on images a little ahead of the sending (the apply phase goes in
            # plan order, the list order): they meet a 409, are parked, and sent after
            def pick() -> list[Key]:
                sent = max(i for i, k in enumerate(private) if sim.counters.patches_per_image[k])
                ahead = [k for k in private[sent + 100 :] if k in changing_set
                         and not sim.counters.patches_per_image[k]][:3]
                for key in ahead:
                    sim.lock_image(*key, 3.0)
                return ahead
            mid_locked.extend(st.call(pick))

        def slow(ms: float) -> Callable[[], None]:
            return lambda: st.call(sim.set_faults, latency_ms=ms)

        mid_locked: list[Key] = []
        changing_set = set(changing)
        form_switch_at: list[int] = []

        def to_date_form() -> None:
            form_switch_at.append(st.call(lambda: sim.counters.faults["429"]))
            st.call(sim.set_faults, retry_after="date")

        events = [(200, lock_unsent), (500, to_date_form), (800, slow(120.0)),
                  (850, slow(1.0))]
        job = write_job(tmp_path, concurrency=32, lock_timeout_seconds=6,
                        retry_budget_seconds=60)
        with Watcher(st, events):
            proc = run_cli(cli_args(job, st, state_dir, *FAST))
        final = {key_of(i): state_of(i) for i in st.call(sim.images)}
        counters = st.call(sim.counters.as_dict)

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_dir = only_run(state_dir)
    rows = one_per_target(results(run_dir), set(private))
    statuses = Counter(r["status"] for r in rows.values())
    assert statuses["planned"] == 0
    assert statuses["updated"] > 2000

    # the one lock that never ends: failed lock_timeout, naming its task, image untouched
    stuck = rows[never]
    assert (stuck["status"], stuck["reason"]) == ("failed", "lock_timeout")
    assert never_task in stuck["error"] and stuck["lock_wait_s"] >= 6.0
    failed = {k for k, r in rows.items() if r["status"] == "failed"}
    assert failed == {never}, [rows[k] for k in failed]

    # the locks that ended: waited for, re-read, planned against what the task left
    for key in [*ends, *mid_locked]:
        assert rows[key]["status"] == "updated", rows[key]
        assert rows[key]["lock_wait_s"] > 0
    assert rows[ends[0]]["before"]["tags"]["team"] == "locked-team"
    assert final[ends[0]]["tags"]["owner"] == "locked-team"
    assert len(mid_locked) == 3 and counters["statuses"].get("409", 0) >= 3

    # every updated image is exactly apply_patch(before, patch), and shows the job's intent
    run_id = run_dir.name
    for key, row in rows.items():
        if row["status"] == "updated":
            assert final[key] == apply_patch(row["before"], row["patch"]), key
            tags = final[key]["tags"]
            assert tags["managed-by"] == "bulk-tagger" and tags["run"] == run_id
            assert "legacy" not in tags and final[key]["ssh_key"] == "allow"
    # nothing else changed: not the skipped ones, not the failed one, not a public image
    untouched = [k for k in final if k not in rows or rows[k]["status"] != "updated"]
    assert len(untouched) > 600
    assert all(final[k] == snapshot[k] for k in untouched)

    # the faults did happen, and did no harm
    faults_seen = counters["faults"]
    assert faults_seen["5xx"] > 0 and faults_seen["drop_before"] > 0
    assert faults_seen["drop_after"] > 0 and faults_seen["latency"] > 0
    assert form_switch_at and 0 < form_switch_at[0] < faults_seen["429"]  # both forms
    assert counters["patch_bodies_with_tags_null"] == 0
    assert not {"400", "415", "422"} & set(counters["statuses"])
    report = summary(run_dir)
    assert report["exit_code"] == 1
    assert {k: v for k, v in report["counts"].items() if v} == dict(statuses)
    assert report["requests"]["retries"] > 0 and report["requests"]["lock_waits"] >= 7


# -- 2. rates -----------------------------------------------------------------------------------
@pytest.mark.timing
def test_a_known_rate_at_the_servers_limit_draws_no_429(tmp_path: Path, state_dir: Path) -> None:
    rate = 100.0
    with SimulatorThread(SimConfig(images=400, faults=Faults(rate_limit=rate))) as st:
        job = write_job(tmp_path)
        proc = run_cli(cli_args(job, st, state_dir, "--rate", str(rate), *FAST))
        counters = st.call(st.sim.counters.as_dict)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = results(only_run(state_dir))
    assert Counter(r["status"] for r in rows)["updated"] > 250
    assert counters["rate_limited"] == 0 and "429" not in counters["statuses"]
    assert rate * 0.85 <= counters["max_per_second"] <= rate


@pytest.mark.timing
def test_an_unknown_limit_is_found(tmp_path: Path, state_dir: Path) -> None:
    limit = 250.0
    faults = Faults(rate_limit=limit, rate_burst=limit / 5)  # a small bucket: no free lunch
    with SimulatorThread(SimConfig(images=1500, faults=faults)) as st:
        job = write_job(tmp_path, concurrency=32)
        with Watcher(st, []) as watcher:
            proc = run_cli(cli_args(job, st, state_dir, *FAST))
        counters = st.call(st.sim.counters.as_dict)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = watcher.samples
    start = next(s for s in samples if s[1] > 0)
    end = next(s for s in samples if s[1] == samples[-1][1])
    useful = (end[2] - start[2]) / (end[0] - start[0])  # 2xx answers a second, while sending
    share = counters["rate_limited"] / counters["total"]
    print(f"limit {limit:g}/s: useful {useful:.1f}/s ({useful / limit:.0%}), "
          f"429s {counters['rate_limited']} of {counters['total']} ({share:.1%}), "
          f"max window {counters['max_per_second']}")
    assert useful >= 0.85 * limit
    assert share <= 0.08  # generous for 4 s: the slow-start exit weighs; `make bench` runs long


# -- 5. signals ---------------------------------------------------------------------------------
def wait_for(condition: Callable[[], bool], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def start_cli(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_exits_75_with_every_target_recorded(
    tmp_path: Path, state_dir: Path, procs: list[subprocess.Popen[str]], sig: signal.Signals
) -> None:
    grace = 5.0
    with SimulatorThread(SimConfig(images=600, faults=Faults(latency_ms=100))) as st:
        private = {key_of(i) for i in st.call(st.sim.images) if i["visibility"] == "private"}
        job = write_job(tmp_path, concurrency=8)
        proc = start_cli(cli_args(job, st, state_dir, "--grace-seconds", str(grace), *FAST))
        procs.append(proc)
        wait_for(lambda: st.call(lambda: st.sim.counters.requests["patch"]) >= 40)
        proc.send_signal(sig)
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=grace + 10)
        took = time.monotonic() - signalled
        assert proc.returncode == 75, stderr[-3000:]
        assert took < grace  # in-flight requests (100 ms) finish; nothing waits for the grace
        run_dir = only_run(state_dir)
        rows = one_per_target(results(run_dir), private)
        statuses = Counter(r["status"] for r in rows.values())
        assert statuses["updated"] >= 40 and statuses["planned"] > 100
        assert set(statuses) <= {"updated", "planned", "skipped", "unchanged"}
        assert summary(run_dir)["exit_code"] == 75
        if sig is signal.SIGTERM:  # and --resume finishes the job
            st.call(st.sim.set_faults, latency_ms=0.0)
            again = run_cli(cli_args(job, st, state_dir, "--resume", *FAST))
            assert again.returncode == 0, again.stderr[-3000:]
            assert only_run(state_dir) == run_dir
            rows = one_per_target(results(run_dir), private)
            done = Counter(r["status"] for r in rows.values())
            assert done["planned"] == 0 and done["failed"] == 0
            assert done["updated"] == statuses["updated"] + statuses["planned"]


def test_sigterm_during_retry_backoff_is_not_swallowed(
    tmp_path: Path, state_dir: Path, procs: list[subprocess.Popen[str]]
) -> None:
    # every PATCH answers 502; the reads of the plan phase do not
    faults = Faults(p_5xx=1.0, methods=frozenset({"PATCH"}))
    with SimulatorThread(SimConfig(images=200, faults=faults)) as st:
        job = write_job(tmp_path, concurrency=4)
        proc = start_cli(cli_args(
            job, st, state_dir, "--grace-seconds", "30", "--retry-base-seconds", "20",
            "--retry-max-wait-seconds", "20", "--lock-poll-seconds", "0.05"))
        procs.append(proc)
        wait_for(lambda: st.call(lambda: st.sim.counters.requests["patch"]) >= 4)
        time.sleep(0.2)  # every worker has had its 502 and waits, up to 20 s
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=40)
        took = time.monotonic() - signalled
    assert proc.returncode == 75, stderr[-3000:]
    assert took < 3.0
    rows = results(only_run(state_dir))
    statuses = Counter(r["status"] for r in rows)
    # nothing was sent through: the planned targets stay pending (skips were decided by the plan)
    assert statuses["planned"] > 100 and set(statuses) <= {"planned", "skipped"}

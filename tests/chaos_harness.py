"""The chaos harness: one seeded schedule of every fault the simulator injects, one real run.

``Scenario.build(seed, images=...)`` draws, from the seed alone, a job (a query over every
project and region plus a CSV selector file with rows of its own and rows naming images that
do not exist) and a fault schedule:

- background faults for the whole run: 5xx with HTML bodies, connections dropped before and
  after the write, slow answers (latency with jitter), in some seeds a server-side rate limit
  (429s with ``Retry-After``);
- storms set mid-run for a moment: 429 (``Retry-After`` as seconds, as an HTTP date, or with
  ``retry-after-ms``), 5xx, drops after the write, slow answers;
- task locks set before the run (some end, applying tags of their own; some never end) and
  mid-run (some end, some never do);
- images deleted mid-run (later PATCHes answer 404);
- in some seeds a 401 (``Faults.auth_fail_after``), before or during the apply phase.

``run_scenario`` starts a ``SimulatorThread``, takes a snapshot of every image, runs the real
CLI in a subprocess while a controller thread fires the mid-run events (triggered by the
simulator's PATCH count, so they land in the apply phase), then checks the invariants and
returns a ``ChaosResult`` whose ``problems`` list is empty when every invariant held:

- every target has exactly one final record (``results.jsonl.gz``), and every image the job
  selects has one;
- for every ``updated`` target the image equals ``plan.apply_patch(before, patch)``, its
  ``before`` is the image as it was (after any lock that ended applied its tags), and its
  ``patch`` is what ``plan.plan_changes`` says for that state; every other image is untouched;
- no read-only tag changed, no ``"tags": null`` was sent, no malformed request (400/415/422);
- the exit code is as README's "Exit codes" says: 4 after a 401, 1 when a target failed, 0
  otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import Key, key_of, state_of
from worker.models import Changes, Image, RunContext
from worker.plan import apply_patch, plan_changes
from worker.simulator import Faults, SimConfig, SimulatorThread

CLI = [sys.executable, "-m", "worker"]
#: short waits (the CLI's hidden test knobs): retries from 50 ms up to 1 s, lock polls 0.2 s
FAST = ("--retry-base-seconds", "0.05", "--retry-max-wait-seconds", "1",
        "--lock-poll-seconds", "0.2")

#: The job's own changes (a row adds its own; see ``Scenario.job``).
SET_TAGS = {"managed-by": "bulk-tagger", "chaos-run": "{run.id}"}
RENAME = {"team": "owner"}
READ_ONLY_KEY = "billing-class"


def read_only_of(image: dict[str, Any]) -> dict[str, str]:
    parsed = Image.from_api(image)
    return {k: parsed.tags[k] for k in parsed.read_only}


@dataclass
class Event:
    """Something the controller does once the simulator has seen ``at_patches`` PATCHes."""

    at_patches: int
    kind: str  # storm | delete | lock | auth
    faults: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    keys: list[Key] = field(default_factory=list)
    lock_seconds: list[float | None] = field(default_factory=list)


@dataclass
class Scenario:
    seed: int
    images: int
    faults: Faults
    events: list[Event]
    concurrency: int
    lock_timeout_s: float
    remove_read_only: bool
    on_read_only: str
    pre_locks: int
    pre_lock_never: int
    file_rows: int
    missing_rows: int
    auth: str | None  # None | "plan" | "apply"
    clean: bool  # only faults a run must ride out: every target must end well

    @classmethod
    def build(cls, seed: int, *, images: int) -> Scenario:
        """Everything about the run drawn from ``seed``: the same seed, the same schedule."""
        rng = random.Random(seed)
        clean = seed % 4 == 0
        auth = None if clean else (rng.choice([None, None, None, "plan", "apply"]))
        faults = Faults(
            seed=seed,
            p_5xx=rng.uniform(0.0, 0.03),
            p_drop_before=rng.uniform(0.0, 0.01),
            p_drop_after=rng.uniform(0.0, 0.01),
            latency_ms=rng.uniform(0.0, 3.0),
            latency_jitter_ms=rng.uniform(0.0, 2.0),
            rate_limit=rng.choice([None, None, rng.uniform(250.0, 600.0)]),
            retry_after=rng.choice(["seconds", "date", "ms"]),
            retry_after_s=rng.uniform(0.1, 0.8),
            auth_fail_after=rng.randint(2, 12) if auth == "plan" else None,
        )
        expected = int(images * 0.8)  # about the private share of the demo images
        events: list[Event] = []
        for _ in range(rng.randint(2, 4)):
            kind = rng.choice(["429", "429", "5xx", "drop_after", "slow"])
            changes: dict[str, dict[str, Any]] = {
                "429": {"p_429": rng.uniform(0.5, 0.9),
                        "retry_after": rng.choice(["seconds", "date", "ms"]),
                        "retry_after_s": rng.uniform(0.1, 1.0)},
                "5xx": {"p_5xx": rng.uniform(0.5, 0.9)},
                "drop_after": {"p_drop_after": rng.uniform(0.2, 0.5)},
                "slow": {"latency_ms": rng.uniform(50.0, 250.0)},
            }
            change = changes[kind]
            events.append(Event(
                at_patches=rng.randint(expected // 10, expected // 2), kind="storm",
                faults=change, duration_s=rng.uniform(0.2, 1.0),
            ))
        if not clean:
            events.append(Event(at_patches=rng.randint(5, expected // 2), kind="delete"))
        events.append(Event(at_patches=rng.randint(5, expected // 2), kind="lock"))
        if auth == "apply":
            events.append(Event(at_patches=rng.randint(expected // 5, expected // 2),
                                kind="auth"))
        remove_read_only = rng.random() < 0.5
        return cls(
            seed=seed, images=images, faults=faults, events=events,
            concurrency=rng.choice([8, 16, 32, 48]),
            lock_timeout_s=2.0,
            remove_read_only=remove_read_only,
            on_read_only=rng.choice(["skip", "partial"]),
            pre_locks=rng.randint(2, 6), pre_lock_never=0 if clean else rng.randint(0, 2),
            file_rows=max(4, images // 100), missing_rows=0 if clean else rng.randint(1, 4),
            auth=auth, clean=clean,
        )

    # -- the job --------------------------------------------------------------------------
    def job_changes(self) -> Changes:
        remove = ("legacy", READ_ONLY_KEY) if self.remove_read_only else ("legacy",)
        return Changes(set_tags=dict(SET_TAGS), remove_tags=remove, rename_tags=dict(RENAME),
                       set_fields={"ssh_key": "allow"})

    def write_job(self, folder: Path, rows: list[dict[str, str]]) -> Path:
        changes = self.job_changes()
        job = {
            "name": "chaos",
            "targets": [
                {"query": {"projects": "all", "regions": "all", "visibility": "private"}},
                {"file": "rows.csv"},
            ],
            "changes": {
                "set_tags": dict(changes.set_tags),
                "remove_tags": list(changes.remove_tags),
                "rename_tags": dict(changes.rename_tags),
                "set": dict(changes.set_fields),
            },
            "options": {
                "concurrency": self.concurrency,
                "lock_timeout_seconds": self.lock_timeout_s,
                "retry_budget_seconds": 60,
                "on_read_only": self.on_read_only,
            },
        }
        with (folder / "rows.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(
                fh, fieldnames=["project_id", "region_id", "image_id", "tag:owner", "remove_tags"]
            )
            writer.writeheader()
            writer.writerows(rows)
        path = folder / "job.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path


@dataclass
class ChaosResult:
    seed: int
    exit_code: int
    expected_exit: int
    targets: int
    records: int
    records_per_target: Counter[int]
    statuses: Counter[str]
    faults: Counter[str]
    requests: int
    mismatches: int
    ambiguous: int
    duration_s: float
    problems: list[str]
    stdout: str = ""
    stderr: str = ""
    run_dir: Path | None = None

    def line(self) -> str:
        per = ",".join(f"{k}x{v}" for k, v in sorted(self.records_per_target.items()))
        faults = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()) if v)
        statuses = " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items()))
        return (
            f"seed {self.seed:3d}: exit {self.exit_code} (want {self.expected_exit}) "
            f"targets {self.targets} records/target {per} mismatches {self.mismatches} "
            f"[{statuses}] faults [{faults}] requests {self.requests} "
            f"{self.duration_s:.1f}s"
        )


class _Controller(threading.Thread):
    """Fires the scenario's mid-run events as the simulator's PATCH count passes them."""

    def __init__(self, st: SimulatorThread, events: list[Event], rng: random.Random,
                 targets: list[Key], faults: Counter[str], *, clean: bool) -> None:
        super().__init__(name="chaos-controller", daemon=True)
        self.st = st
        self.clean = clean
        self.events = sorted(events, key=lambda e: e.at_patches)
        self.rng = rng
        self.targets = targets
        self.faults = faults
        self.done = threading.Event()
        self.deleted: set[Key] = set()
        self.locked: dict[Key, str] = {}  # mid-run locks (no tags of their own)
        self.error: BaseException | None = None

    def run(self) -> None:
        sim = self.st.sim
        baseline = self.st.call(lambda: sim.faults.as_dict())  # noqa: PLW0108 (read on its loop)
        active: list[tuple[float, dict[str, Any]]] = []  # storms on: (end, changes), by start
        try:
            while not self.done.is_set():
                patches = self.st.call(lambda: sim.counters.requests["patch"])
                now = time.monotonic()
                while self.events and self.events[0].at_patches <= patches:
                    active.extend(self._fire(self.events.pop(0), now))
                ended = [storm for storm in active if storm[0] <= now]
                if ended:
                    # back to the baseline, unless a storm still on sets the same fault
                    active = [storm for storm in active if storm[0] > now]
                    back = {k: baseline[k] for _, changes in ended for k in changes}
                    for _, changes in active:
                        back.update({k: v for k, v in changes.items() if k in back})
                    self.st.call(sim.set_faults, **back)
                self.done.wait(0.02)
        except BaseException as exc:  # surfaced by run_scenario
            self.error = exc
        finally:
            with contextlib.suppress(Exception):
                if active:
                    self.st.call(sim.set_faults, **{
                        k: baseline[k] for _, changes in active for k in changes})

    def _fire(self, event: Event, now: float) -> list[tuple[float, dict[str, Any]]]:
        sim = self.st.sim
        rng = self.rng
        if event.kind == "storm":
            self.st.call(sim.set_faults, **event.faults)
            self.faults["storm_" + next(iter(event.faults)).removeprefix("p_")] += 1
            return [(now + event.duration_s, dict(event.faults))]
        if event.kind == "auth":
            self.st.call(sim.set_faults, auth_fail_after=0)
            self.faults["auth_revoked"] += 1
            return []
        picks = rng.sample(self.targets, min(len(self.targets), rng.randint(3, 8)))
        for key in picks:
            if key in self.deleted or key in self.locked:
                continue
            if event.kind == "delete":
                self.st.call(sim.delete_image, *key)
                self.deleted.add(key)
                self.faults["deleted_mid_run"] += 1
            else:
                ends = rng.uniform(0.2, 1.0)
                seconds = ends if self.clean else rng.choice([None, ends, ends])
                self.locked[key] = self.st.call(sim.lock_image, *key, seconds)
                self.faults["lock_mid_run_" + ("never" if seconds is None else "ends")] += 1
        return []


def run_cli(
    *args: str | Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GCORE_", "BULK_"))}
    full_env.update(env)
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, env=full_env,
        timeout=timeout, check=False,
    )


def run_scenario(
    scenario: Scenario,
    folder: Path,
    *,
    api_key: str = "chaos-key-0123456789",
    sim_api_key: str | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 600.0,
) -> ChaosResult:
    """Run ``scenario`` end to end in ``folder`` and check every invariant."""
    rng = random.Random(scenario.seed * 7919 + 1)
    config = SimConfig(images=scenario.images, seed=scenario.seed, api_key=sim_api_key,
                       faults=scenario.faults)
    folder.mkdir(parents=True, exist_ok=True)
    state_dir = folder / "state"
    injected: Counter[str] = Counter()
    with SimulatorThread(config) as st:
        sim = st.sim
        images = st.call(sim.images)
        private = [key_of(i) for i in images if i.get("visibility") == "private"]
        # pre-run locks: some end (applying tags of their own), some never do
        pre_locks: dict[Key, tuple[str, dict[str, str]]] = {}
        for n, key in enumerate(rng.sample(private, scenario.pre_locks + scenario.pre_lock_never)):
            never = n < scenario.pre_lock_never
            tags = {"lock-note": f"task-{n}", "legacy": "from-task"}
            seconds = None if never else rng.uniform(0.3, 1.2)
            end_state = rng.choice(["FINISHED", "ERROR"])
            task = st.call(sim.lock_image, *key, seconds, end_state=end_state,
                           set_tags=None if never else tags)
            pre_locks[key] = (task, {} if never else tags)
            injected["lock_before_" + ("never" if never else "ends")] += 1
        snapshot = {key_of(i): i for i in st.call(sim.images)}
        # the selector file: rows of existing images with changes of their own, and rows
        # naming images that do not exist (valid ids in a valid place)
        rows: list[dict[str, str]] = []
        row_changes: dict[Key, Changes] = {}
        for n, key in enumerate(rng.sample(private, scenario.file_rows)):
            owner = f"row-owner-{n}" if n % 2 == 0 else ""
            remove = "env" if n % 3 == 0 else ""
            rows.append({"project_id": str(key[0]), "region_id": str(key[1]),
                         "image_id": key[2], "tag:owner": owner, "remove_tags": remove})
            row_changes[key] = Changes(
                set_tags={"owner": owner} if owner else {},
                remove_tags=(remove,) if remove else (),
            )
        missing: list[Key] = []
        for n in range(scenario.missing_rows):
            key = (1337, 7, f"00000000-dead-4bad-8bad-{n:012d}")
            missing.append(key)
            rows.append({"project_id": "1337", "region_id": "7", "image_id": key[2],
                         "tag:owner": "", "remove_tags": ""})
            injected["missing_row"] += 1
        job_path = scenario.write_job(folder, rows)
        st.call(sim.reset_counters)
        # mid-run events spare the images locked before the run: a second lock would take
        # the first one over, and its tags would never be applied
        controller = _Controller(st, list(scenario.events), random.Random(scenario.seed + 1),
                                 [k for k in private if k not in pre_locks], injected,
                                 clean=scenario.clean)
        run_id = f"chaos-seed-{scenario.seed}"
        started = time.monotonic()
        controller.start()
        try:
            proc = run_cli(
                "run", job_path, "--base-url", st.url, "--state-dir", state_dir,
                "--run-id", run_id, "--log-format", "json", *FAST, *extra_args,
                env={"GCORE_API_KEY": api_key}, timeout=timeout,
            )
        finally:
            controller.done.set()
            controller.join(30)
        duration = time.monotonic() - started
        if controller.error is not None:
            raise controller.error
        counters = st.call(sim.counters.as_dict)
        left_on = st.call(lambda: sim.faults.as_dict())  # noqa: PLW0108 (read on its loop)
        # the images and their tasks' states at one instant: ``images()`` settles the tasks
        # that ended (applying their tags); settling again between the two reads let a task
        # end after the images were read (seed 41, a run stopped by a 401 within 0.3 s)
        def final_view() -> tuple[list[dict[str, Any]], dict[Key, bool]]:
            now_images = sim.images()
            tasks = sim.store.tasks
            return now_images, {key: tasks[task].state != "RUNNING"
                                for key, (task, _) in pre_locks.items()}

        final_images, lock_ended = st.call(final_view)
        final = {key_of(i): i for i in final_images}

    run_dir = state_dir / run_id
    problems: list[str] = []
    records: list[dict[str, Any]] = []
    if (run_dir / "results.jsonl.gz").exists():
        with gzip.open(run_dir / "results.jsonl.gz", "rt", encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
    else:
        problems.append(f"no results.jsonl.gz in {run_dir}")
    by_key: dict[Key, dict[str, Any]] = {}
    per_target: Counter[Key] = Counter()
    for row in records:
        key = (int(row["project_id"]), int(row["region_id"]), str(row["image_id"]))
        per_target[key] += 1
        by_key[key] = row
    records_per_target = Counter(per_target.values())
    for key, n in per_target.items():
        if n != 1:
            problems.append(f"{key}: {n} records")
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        counted = sum(summary.get("counts", {}).values())
        if counted != len(records):
            problems.append(f"summary counts {counted} targets, results.jsonl.gz {len(records)}")

    # every image the job selects has its record (unless the run stopped early: 401)
    selected = set(private) | set(row_changes) | set(missing)
    if scenario.auth is None:
        lost = sorted(selected - set(by_key) - controller.deleted)
        if lost:
            problems.append(f"{len(lost)} selected images have no record, e.g. {lost[:3]}")
    extra = sorted(set(by_key) - selected)
    if extra:
        problems.append(f"{len(extra)} records for images the job does not select: {extra[:3]}")

    ctx = RunContext(run_id=run_id, run_date=str(summary.get("started_at", ""))[:10])
    changes = scenario.job_changes()
    partial = scenario.on_read_only == "partial"
    mismatches = ambiguous = 0
    for key, image in snapshot.items():
        rec = by_key.get(key)
        if key not in final:
            if key in controller.deleted and rec is not None and not (
                rec["status"] in ("updated", "unchanged", "skipped")
                or (rec["status"] == "failed" and rec["reason"] in ("not_found", "lock_timeout"))
                or (rec["status"] == "planned" and scenario.auth is not None)
            ):
                problems.append(f"{key}: deleted mid-run, record {rec['status']}/{rec['reason']}")
            elif key not in controller.deleted:
                problems.append(f"{key}: vanished from the simulator")
            continue
        base = state_of(image)
        task_tags = pre_locks.get(key, ("", {}))[1]
        if task_tags and lock_ended.get(key):
            base = apply_patch(base, {"tags": task_tags})
        now = state_of(final[key])
        if read_only_of(final[key]) != read_only_of(image):
            mismatches += 1
            problems.append(f"{key}: read-only tags changed: {read_only_of(image)} -> "
                            f"{read_only_of(final[key])}")
        status = rec["status"] if rec is not None else None
        # what the plan says for the image as it was: the change the run may have made
        want = plan_changes(
            Image.from_api({**image, "tags": [
                {"key": k, "value": v, "read_only": k in read_only_of(image)}
                for k, v in base["tags"].items()]}),
            changes.merged(row_changes.get(key, Changes())), ctx, partial=partial,
        )
        if status == "updated":
            assert rec is not None
            expected = apply_patch(rec["before"] or {}, rec["patch"] or {})
            if now != expected:
                mismatches += 1
                problems.append(f"{key}: updated, but the image is {now}, not {expected}")
            elif rec["before"] != base:
                mismatches += 1
                problems.append(f"{key}: record's before {rec['before']} is not the image's "
                                f"state before the run {base}")
            elif want.patch != rec["patch"]:
                mismatches += 1
                problems.append(f"{key}: patch {rec['patch']} is not the plan's {want.patch}")
        elif now != base:
            landed = want.patch is not None and now == apply_patch(base, want.patch)
            if status == "planned" and scenario.auth is not None and landed:
                ambiguous += 1  # a write whose answer was lost, then the 401 stopped the run
            else:
                mismatches += 1
                problems.append(
                    f"{key}: {status}/{rec and rec.get('reason')} but changed: {base} -> {now}"
                    + (" (the PATCH landed, the record does not say so)" if landed else "")
                )
    baseline = scenario.faults.as_dict()
    if {k: v for k, v in left_on.items() if k != "auth_fail_after"} != {
            k: v for k, v in baseline.items() if k != "auth_fail_after"}:
        problems.append(f"harness: faults left on after the run: {left_on}")
    unauthorized = int(counters["faults"].get("401", 0))
    if scenario.auth is None and unauthorized:
        problems.append(f"{unauthorized} answers 401 in a seed without a revoked key")
    # "the run stops at once": only what was in flight (workers, parked lock polls) meets it
    in_flight = (scenario.concurrency + scenario.pre_locks + scenario.pre_lock_never
                 + len(controller.locked) + 4)
    if unauthorized > in_flight:
        problems.append(f"{unauthorized} requests after the 401, more than the {in_flight} "
                        "that could have been in flight: the run did not stop at once")
    if counters["patch_bodies_with_tags_null"]:
        problems.append(f'{counters["patch_bodies_with_tags_null"]} PATCH bodies with tags null')
    bad = {s: n for s, n in counters["statuses"].items() if s in ("400", "415", "422")}
    if bad:
        problems.append(f"malformed requests answered {bad}")

    statuses = Counter(row["status"] for row in records)
    expected_exit = 4 if scenario.auth is not None else 1 if statuses.get("failed") else 0
    if scenario.clean and scenario.auth is None and statuses.get("failed"):
        problems.append(f"a clean seed (transient faults only) failed targets: "
                        f"{Counter(r['reason'] for r in records if r['status'] == 'failed')}")
    if scenario.auth is None and statuses.get("planned"):
        unended = [k for k, r in by_key.items() if r["status"] == "planned"]
        problems.append(
            f"{len(unended)} targets never ended (no outcome, exit {proc.returncode}): "
            + ", ".join(
                f"{k[2]} (locked mid-run: {k in controller.locked}, before the run: "
                f"{k in pre_locks}, deleted: {k in controller.deleted})" for k in unended[:5]
            )
        )
    if proc.returncode != expected_exit:
        problems.append(f"exit {proc.returncode}, want {expected_exit}")
    if summary and summary.get("exit_code") != proc.returncode:
        problems.append(f"summary says exit {summary.get('exit_code')}, process {proc.returncode}")
    if "Traceback" in proc.stderr or "internal error" in proc.stderr:
        problems.append("a traceback or internal error on stderr")
    faults: Counter[str] = Counter({k: v for k, v in counters["faults"].items() if v})
    faults["429_rate_limit"] = counters["rate_limited"] - counters["faults"].get("429", 0)
    faults.update(injected)
    return ChaosResult(
        seed=scenario.seed, exit_code=proc.returncode, expected_exit=expected_exit,
        targets=len(per_target), records=len(records), records_per_target=records_per_target,
        statuses=statuses, faults=+faults, requests=int(counters["total"]),
        mismatches=mismatches, ambiguous=ambiguous, duration_s=duration, problems=problems,
        stdout=proc.stdout, stderr=proc.stderr, run_dir=run_dir,
    )


def format_report(results: list[ChaosResult], title: str) -> str:
    """The report ``make chaos`` prints: per seed, then the totals."""
    faults: Counter[str] = Counter()
    per: Counter[int] = Counter()
    exits: Counter[int] = Counter()
    for r in results:
        faults.update(r.faults)
        per.update(r.records_per_target)
        exits[r.exit_code] += 1
    lines = [f"== {title}: {len(results)} seeds ==", *(r.line() for r in results)]
    lines += [
        "-- totals --",
        f"seeds: {len(results)}  exit codes: "
        + ", ".join(f"{k}x{v}" for k, v in sorted(exits.items())),
        f"targets: {sum(r.targets for r in results)}  records: {sum(r.records for r in results)}"
        f"  requests at the simulator: {sum(r.requests for r in results)}",
        "records per target: " + ", ".join(f"{k} record x {v}" for k, v in sorted(per.items())),
        f"state mismatches: {sum(r.mismatches for r in results)}"
        f"  (writes whose answer was lost before a 401 stopped the run: "
        f"{sum(r.ambiguous for r in results)})",
        f"seeds with a broken invariant: {sum(1 for r in results if r.problems)}",
        "faults injected by kind:",
        *(f"  {k:24s} {v}" for k, v in sorted(faults.items())),
        f"wall time: {sum(r.duration_s for r in results):.1f}s",
        per_target_line(results),
    ]
    for r in results:
        for problem in r.problems[:10]:
            lines.append(f"seed {r.seed}: {problem}")
    return "\n".join(lines)


def per_target_line(results: list[ChaosResult]) -> str:
    """Wall time per target: the median seed's and the slowest seed's, as a ratio (a seed a
    401 stops early is quick per target: the median of the seeds that ran to the end is
    given too)."""
    per = {r.seed: r.duration_s * 1000 / r.targets for r in results if r.targets}
    if not per:
        return "time per target: no targets"
    median = statistics.median(per.values())
    full = [per[r.seed] for r in results if r.targets and r.expected_exit != 4]
    slow = max(per, key=per.__getitem__)
    to_end = (f"; of the {len(full)} that ran to the end {statistics.median(full):.2f}"
              if full else "")
    return (f"time per target: median seed {median:.2f} ms{to_end}; slowest seed {slow} "
            f"{per[slow]:.2f} ms = {per[slow] / median:.2f}x the median")

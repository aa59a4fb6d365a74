"""The plan phase of a run: each target planned into the journal, and what it plans from when
it is not a job's selectors (a reviewed plan applied, an undone run's targets).

``Recorder`` plans each target (``worker.plan``) and buffers it in the journal as ``planned``
or with its final no-op outcome (a bad id, a gone image, a conflict, a no-op's reason),
waiting for the journal's writer when it falls behind (memory stays flat in the plan's
size); a plan (or a preview) also adds up its changes per key and keeps a few samples for
its text.

Applying a reviewed plan (``run --plan PLAN_RUN_ID``) and reading a run's targets again:

``check_plan`` decides whether a plan run may be applied, before anything is sent: it must be
a finished ``plan`` (a job's, or an undo's preview), made from this very job file (its hash),
of the same shard, and no older than ``--plan-max-age``. Any mismatch is a ``JobError`` naming
it (exit 2).

``read_again`` reads the state now of another run's targets (a plan's planned ones,
``planned_rows``; a run's updated ones for undo, ``Journal.iter_updated``) by the file
selectors' join (``Expander.reread``: a region is listed where that costs fewer requests than
one GET an image), and hands each row out with the image as it is now (None where it is gone).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from worker import nextstep, safety, units
from worker.errors import ExitCode, JobError
from worker.journal import Journal, read_run_info
from worker.models import Changes, Image, RunContext, Target
from worker.plan import inverse_patch, plan_changes, shows
from worker.selectors import Expander
from worker.spec import Job
from worker.tally import KeyTally

#: a target of another run: (project, region, image, name, before, patch), as
#: ``Journal.iter_updated`` gives it
Row = tuple[int, int, str, str, dict[str, Any], dict[str, Any]]


@dataclass(slots=True)
class Again:
    """Another run's target, read again: what to record for it.

    ``conflict``: why it is ``skipped``/``conflict`` (changed since). Otherwise ``patch`` is
    the exact patch to send (``run --plan``: never planned again), or None to plan
    ``target.changes`` (undo; a gone image: ``not_found``). ``expect``: what the image must
    still show when it is sent, checked again where the pool reads it again (a lock, a
    resume)."""

    target: Target
    name: str
    expect: dict[str, Any] | None = None
    patch: dict[str, Any] | None = None
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class PlanRef:
    """A plan run that passed ``check_plan``: its id and, for an undo's preview, the run the
    undo reverts."""

    run_id: str
    undone: str | None


def check_plan(
    state_dir: Path, plan_run_id: str, *, job: Job | None, shard: str | None,
    max_age: timedelta, now: datetime | None = None,
) -> PlanRef:
    """The plan run ``plan_run_id`` checked against what this run is (its job file, shard,
    time). Raises ``JobError`` (exit 2) naming the mismatch."""
    field = "--plan"
    info = read_run_info(safety.run_dir(state_dir, plan_run_id, field=field))
    job_hash = job.sha256 if job else None
    job_path = str(job.path) if job else None
    if not info:
        raise JobError(f"no plan run {plan_run_id!r}", field=field,
                       hint="give the run id `bulk-tagger plan` printed (its folder's name)")
    if info.get("kind") != "plan":
        raise JobError(f"run {plan_run_id} is a {info.get('kind')}, not a plan", field=field,
                       hint="`bulk-tagger plan JOB` (or `undo RUN_ID --plan`) makes one")
    if info.get("exit_code") not in (ExitCode.OK, ExitCode.FAILED):
        raise JobError(
            f"plan {plan_run_id} did not finish (exit code {info.get('exit_code')})",
            field=field, hint="plan again")
    undone = info.get("parent_run_id") or None
    if undone is not None:  # an undo's preview: no job file goes with it
        if job_hash is not None:
            raise JobError(f"plan {plan_run_id} is a preview of undoing {undone}: "
                           "it takes no job file", field="JOB",
                           hint=nextstep.command("run", "--plan", plan_run_id,
                                                 state_dir=state_dir))
    elif job_hash is None:
        raise JobError(f"plan {plan_run_id} was made from a job file: give it", field="JOB",
                       hint=nextstep.command("run", "JOB", "--plan", plan_run_id,
                                             state_dir=state_dir))
    elif info.get("job_hash") != job_hash:
        raise JobError(
            f"plan {plan_run_id} was made from another version of {job_path}", field=field,
            hint="plan the job file as it is now, review that plan, and apply it")
    if (info.get("shard") or None) != shard:
        raise JobError(
            f"plan {plan_run_id} is of shard {info.get('shard') or 'none (the whole job)'}, "
            f"this run is of shard {shard or 'none (the whole job)'}", field="--shard",
            hint="apply each shard's own plan with the same --shard")
    started = datetime.fromisoformat(str(info.get("started_at")).replace("Z", "+00:00"))
    age = (now or datetime.now(UTC)) - started
    if age > max_age:
        old, limit = (units.duration_text(t.total_seconds()) for t in (age, max_age))
        raise JobError(
            f"plan {plan_run_id} is {old} old, over --plan-max-age {limit}", field="--plan-max-age",
            hint="the images may have changed since: plan again (or raise --plan-max-age)")
    return PlanRef(plan_run_id, undone)


def planned_rows(source: Journal) -> Iterator[Row]:
    """A plan run's planned targets (what ``run --plan`` applies), from its record (a
    finished run's journal is compacted: ``Journal.iter_results`` reads either)."""
    for row in source.iter_results(""):
        if row["status"] == "planned" and row["patch"]:
            yield (int(row["project_id"]), int(row["region_id"]), str(row["image_id"]),
                   row["name"] or "", row["before"] or {}, row["patch"])


async def read_again(
    expander: Expander, rows: Iterable[Row]
) -> AsyncIterator[tuple[Row, Image | None]]:
    """Each of ``rows`` with its image as it is now (None: gone), read by list pages where
    that is cheaper (``Expander.reread``). The row rides along as the staged key's tag: on
    disk, never held in memory; rows come out grouped by region."""
    keys = ((p, r, image_id, orjson.dumps(row).decode())
            for row in rows for p, r, image_id in (row[:3],))
    async for tag, image in expander.reread(keys):
        p, r, image_id, name, before, patch = orjson.loads(tag)
        yield (p, r, image_id, name, before, patch), image


async def undo_targets(expander: Expander, run_dir: Path) -> AsyncIterator[Again]:
    """Each updated target of the run in ``run_dir``, to be planned back (its inverse patch)
    where the image still shows what the run set."""
    parent = Journal(run_dir)
    try:
        async for row, image in read_again(expander, parent.iter_updated()):
            p, r, image_id, name, before, patch = row
            changes = Changes.from_patch(inverse_patch(before, patch))
            changed = image is not None and not shows(image.state(), patch)
            yield Again(Target(p, r, image_id, changes, image, "undo"), name, expect=patch,
                        conflict="the image no longer shows what the run set: changed since"
                        if changed else None)
    finally:
        parent.close()


async def plan_targets(expander: Expander, run_dir: Path) -> AsyncIterator[Again]:
    """Each planned target of the plan run in ``run_dir``, with exactly its patch where the
    image is still as the plan saw it."""
    source = Journal(run_dir)
    where = f"plan {run_dir.name}"
    try:
        async for row, image in read_again(expander, planned_rows(source)):
            p, r, image_id, name, before, patch = row
            target = Target(p, r, image_id, Changes.from_patch(patch), image, where)
            if image is None:
                yield Again(target, name)  # recorded failed / not_found
            elif image.state() != before:
                yield Again(target, name,
                            conflict="the image changed since the plan read it: not applied")
            else:
                yield Again(target, name, expect=before, patch=patch)
    finally:
        source.close()


#: a plan's sample: (name, image id, state before, patch)
Sample = tuple[str, str, dict[str, Any], dict[str, Any]]


@dataclass(slots=True)
class Recorder:
    """Targets planned into ``journal`` (``ctx``: the run's, for templates; ``partial``:
    ``on_read_only: partial``). ``tally`` (a plan, a preview: nothing is sent): the changes
    per key in ``keys`` and the first ``max_samples`` patches in ``samples``. ``reasons``:
    the no-ops and failures by ``status:reason``."""

    journal: Journal
    ctx: RunContext
    partial: bool
    tally: bool
    max_samples: int
    keys: KeyTally = field(default_factory=KeyTally)
    samples: list[Sample] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)

    async def targets(self, targets: AsyncIterator[Target]) -> None:
        """Each of ``targets`` planned and recorded."""
        async for target in targets:
            self.record(target)
            await self.journal.room()  # the writer behind: wait (memory stays flat)

    def record(self, target: Target, expect: dict[str, Any] | None = None) -> None:
        """``target`` planned against its image and recorded (``expect``: see ``Again``)."""
        image = target.image
        status: str
        reason: str | None
        detail: str | None
        before: dict[str, Any] | None
        patch: dict[str, Any] | None
        bad_id = safety.image_id_problem(target.image_id)
        if bad_id is not None:  # never sent: an id that would not stay one path segment
            status, reason, detail, before, patch = "failed", "bad_id", bad_id, None, None
            name = image.name if image is not None else ""
        elif image is None:
            status, reason, detail, before, patch = (
                "failed", "not_found", "no such image", None, None)
            name = ""
        else:
            plan = plan_changes(image, target.changes, self.ctx, partial=self.partial)
            status, reason, detail, patch = plan.status, plan.reason, plan.detail, plan.patch
            before = image.state()
            name = image.name
            if self.tally:
                self.keys.add(before, patch or {}, kept=target.changes.add_tags)
                if patch is not None and len(self.samples) < self.max_samples:
                    self.samples.append((name, image.id, before, patch))
        if reason:
            self.reasons[f"{status}:{reason}"] += 1
        self.journal.add_target(
            project_id=target.project_id, region_id=target.region_id,
            image_id=target.image_id, name=name, source=target.source,
            changes=target.changes, before=before, patch=patch,
            lock_task=image.task_id if image is not None else None,
            plan_status=status, plan_reason=reason, plan_detail=detail, expect=expect,
        )

    async def again(self, targets: AsyncIterator[Again]) -> None:
        """Another run's targets read again (undo: the run's updated ones; run --plan: the
        plan's planned ones), recorded as ``undo_targets`` or ``plan_targets`` decided."""
        journal = self.journal
        async for again in targets:
            await journal.room()  # as in ``targets``: the writer behind, the reading waits
            target, image = again.target, again.target.image
            if again.conflict is not None:
                self.conflict(target, again.name, again.conflict)
            elif again.patch is None or image is None:
                self.record(target, expect=again.expect)
            else:  # the reviewed plan's own patch: what is sent is what was reviewed
                journal.add_target(
                    project_id=target.project_id, region_id=target.region_id,
                    image_id=target.image_id, name=image.name, source=target.source,
                    changes=target.changes, before=again.expect, patch=again.patch,
                    lock_task=image.task_id, plan_status="planned", plan_reason=None,
                    plan_detail=None, expect=again.expect)

    def conflict(self, target: Target, name: str, detail: str) -> None:
        """``target`` recorded ``skipped`` / ``conflict``: its image changed since."""
        assert target.image is not None
        self.reasons["skipped:conflict"] += 1
        self.journal.add_target(
            project_id=target.project_id, region_id=target.region_id,
            image_id=target.image_id, name=target.image.name or name, source=target.source,
            changes=target.changes, before=target.image.state(), patch=None, lock_task=None,
            plan_status="skipped", plan_reason="conflict", plan_detail=detail,
        )

"""Applying a reviewed plan (``run --plan PLAN_RUN_ID``) and reading a run's targets again.

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

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from worker import safety, units
from worker.errors import ExitCode, JobError
from worker.journal import Journal, read_run_info
from worker.models import Changes, Image, Target
from worker.plan import inverse_patch, shows
from worker.selectors import Expander
from worker.spec import Job

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
                           hint=f"bulk-tagger run --plan {plan_run_id}")
    elif job_hash is None:
        raise JobError(f"plan {plan_run_id} was made from a job file: give it", field="JOB",
                       hint=f"bulk-tagger run JOB --plan {plan_run_id}")
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

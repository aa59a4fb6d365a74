"""Which folder a command's run works in, held by it alone, and its journal opened.

``RunFolder.choose`` decides the run's id before any request is sent: a new one, ``--run-id``'s,
or the run ``--resume`` continues (``retention.find_resumable``; one made from another version
of the job file is refused). A run ``--resume`` continues is locked before anything is written
(``worker.runlock``: a second ``--resume`` of it refuses instead of starting a parallel new
run); a new run is refused before its folder is made when the state volume clearly cannot hold
it (``worker.statevol``), and locked once made. ``run --plan`` checks its plan here
(``planrun.check_plan``), and an undo refuses a run still being written.

``open_journal`` then creates the journal's run row, or reopens the row of the run resumed
(its earlier process's summary and first date kept for this one). The lock is held to the end
of the command (``release``); a new run refused before it started leaves no folder
(``discard_unstarted``).
"""

from __future__ import annotations

import contextlib
import shutil
from datetime import datetime
from typing import Any

from worker import nextstep, retention, safety, spec, statevol
from worker.errors import JobError
from worker.journal import Journal, now_iso, read_run_info
from worker.log import get_logger
from worker.planrun import PlanRef, check_plan
from worker.runlock import RunHeld, RunLock, held_message, is_held
from worker.runsettings import RunSettings, new_run_id

log = get_logger("bulk_tagger.run")


class RunFolder:
    """The folder of one command's run (``kind``: "run" | "plan" | "undo")."""

    def __init__(
        self, settings: RunSettings, *, kind: str, job: spec.Job | None, job_name: str,
        parent_run_id: str | None, started_at: datetime,
    ) -> None:
        self.settings = settings
        self.kind = kind
        self.job = job
        self.job_name = job_name
        self.parent_run_id = parent_run_id
        self.started_at = started_at
        self.run_id = ""
        self.resumed = False
        self.lock: RunLock | None = None  # held from before the journal opens to the end
        #: run --plan: the plan being applied (checked when the run is chosen)
        self.plan_ref: PlanRef | None = None
        #: the summary of the process this one resumes (requests and time are added up)
        self.earlier: dict[str, Any] | None = None
        #: when the run began (a resumed run: its first process's start; templates' date)
        self.run_started = started_at

    @property
    def job_hash(self) -> str:
        return (self.job.sha256 if self.job else self.parent_run_id) or ""

    @property
    def shard(self) -> str | None:
        return str(self.settings.shard) if self.settings.shard else None

    def choose(self) -> None:
        """The run's id: a new one, ``--run-id``'s, or the run ``--resume`` continues (a
        refusal here comes before any request)."""
        settings = self.settings
        safety.state_dir(settings.state_dir)
        shard = self.shard
        if settings.plan_run_id is not None:  # refused before anything is made (exit 2)
            self.plan_ref = check_plan(settings.state_dir, settings.plan_run_id, job=self.job,
                                       shard=shard, max_age=settings.plan_max_age)
        job_hash = self.job_hash
        kind = self.kind
        run_id = settings.run_id
        if run_id is not None:
            safety.run_dir(settings.state_dir, run_id)  # a safe name, and ours if it exists
        if settings.resume and kind != "plan" and not settings.preview:
            found = run_id if run_id and (settings.state_dir / run_id).is_dir() else None
            if found is None and run_id is None:
                found = retention.find_resumable(
                    settings.state_dir, job_name=self.job_name, job_hash=job_hash,
                    kind=kind, shard=shard, within=settings.resume_within,
                )
            if found is not None:
                info = read_run_info(settings.state_dir / found)
                if info.get("job_hash") != job_hash:
                    raise JobError(
                        f"run {found} was made from another version of this job file",
                        field="--resume",
                    )
                # taken before anything is written or sent: a second --resume of the same
                # run refuses here (exit 75) instead of starting a parallel new run
                self._lock(found, latest=run_id is None)
                finished = read_run_info(settings.state_dir / found).get("exit_code")
                if run_id is None and finished not in retention.UNFINISHED:
                    self.release()  # its holder finished it meanwhile: the next is new
                    self.lock = None
                else:
                    run_id, self.resumed = found, True
        if run_id is None:
            run_id = new_run_id(self.job_name, settings.shard, kind, self.started_at)
        elif not self.resumed and (settings.state_dir / run_id / "journal.sqlite").exists():
            raise JobError(f"run {run_id} exists already", field="--run-id",
                           hint="pass --resume to continue it, or choose another id")
        if self.kind == "undo" and self.parent_run_id:
            holder = is_held(settings.state_dir / self.parent_run_id)
            if holder is not None:  # its record is still being written: undo it later
                raise RunHeld(held_message(self.parent_run_id, holder))
        if self.lock is None:
            self.check_space(None)  # a new run: refused before its folder is made
            safety.private_run_dir(settings.state_dir / run_id)
            self._lock(run_id)
        self.run_id = run_id

    def open_journal(self, options: dict[str, Any]) -> Journal:
        """The chosen run's journal: its run row made (``options``: the run's, recorded), or
        the resumed run's reopened."""
        settings = self.settings
        run_id, shard = self.run_id, self.shard
        journal = Journal(settings.state_dir / run_id)
        if self.resumed and journal.compacted:
            journal.close()
            record = nextstep.command("report", run_id, state_dir=settings.state_dir)
            raise JobError(f"run {run_id} has finished: there is nothing to resume",
                           field="--resume", hint=f"`{record}` shows its record")
        if self.resumed:
            self.check_space(journal)
            info = journal.run_info()
            # what the earlier process recorded (none if it was killed before its end): the
            # summary adds this process to it; templates keep the run's first date
            self.earlier = info.get("summary") or None
            with contextlib.suppress(TypeError, ValueError):
                self.run_started = datetime.fromisoformat(str(info.get("started_at")))
            journal.reopen_run()
            log.info("run.resumed", run_id=run_id, counts=journal.counts())
        else:
            journal.create_run(  # an undo's preview is a plan run (run --plan applies it)
                run_id=run_id, kind="plan" if settings.preview else self.kind,
                job_name=self.job_name,
                job_path=str(self.job.path) if self.job else None, job_hash=self.job_hash,
                options=options, parent_run_id=self.parent_run_id, shard=shard,
                started_at=now_iso(self.started_at),
            )
            log.info("run.started", run_id=run_id, kind=self.kind, job=self.job_name)
        return journal

    def check_space(self, journal: Journal | None) -> None:
        """Refuse before planning (nothing sent) a run that clearly cannot fit on the state
        volume: its size is the last run of this job's (a resumed run: its own targets)."""
        bytes_per_target, targets = statevol.measured_bytes_per_target(
            self.settings.state_dir, self.job_name)
        held = 0
        if journal is not None:
            targets = max(targets, journal.plan_counts()[1])
            held = statevol.folder_bytes(journal.run_dir)
        statevol.check_space(self.settings.state_dir, targets=targets,
                             bytes_per_target=bytes_per_target, held=held)

    def _lock(self, run_id: str, *, latest: bool = False) -> None:
        command = f"bulk-tagger {self.kind}" + (" --resume" if self.settings.resume else "")
        self.lock = RunLock.acquire(
            self.settings.state_dir / run_id, run_id=run_id, command=command, latest=latest
        )

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def discard_unstarted(self) -> None:
        """A new run the probe refused leaves no folder behind (nothing to resume, report)."""
        if not self.resumed and self.run_id:
            self.release()
            self.lock = None
            if not (self.settings.state_dir / self.run_id / "journal.sqlite").exists():
                shutil.rmtree(self.settings.state_dir / self.run_id, ignore_errors=True)

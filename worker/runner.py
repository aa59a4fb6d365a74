"""A run from end to end: the stages (README, "How it is built") wired together for ``run``,
``plan`` and ``undo`` (the CLI only parses and calls these).

``run`` is plan, then apply: the whole plan is streamed into the journal first (so a bad row
deep in a file, or a plan over the safety limit, stops the run before any PATCH), then the
apply phase streams the planned targets back out of the journal into the pool.

Signals: the first SIGTERM/SIGINT stops taking targets and lets in-flight ones finish for at
most ``grace_s``; a second one stops at once. Either way the journal is committed, the
exports written, and the exit code is 75 (``--resume`` goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from worker import api, apply, exports, report, retention, retry, safety, spec, statevol
from worker.budget import CircuitBreaker, RetryBudget
from worker.errors import (
    ApiError,
    AuthFailed,
    BadAnswer,
    BulkTaggerError,
    CircuitOpen,
    ExitCode,
    JobError,
    SafetyLimit,
)
from worker.journal import Journal, now_iso, read_run_info
from worker.limiter import AdaptiveLimiter, RateController
from worker.log import get_logger, scrub
from worker.metrics import push_metrics
from worker.models import RunContext, Target
from worker.plan import plan_changes
from worker.planrun import Again, PlanRef, check_plan, plan_targets, undo_targets
from worker.pool import Pool, PoolSettings
from worker.preflight import check_limits, check_names
from worker.progress import Progress
from worker.runlock import RunHeld, RunLock, held_message, is_held
from worker.runsettings import RunSettings, new_run_id
from worker.selectors import Expander, Known
from worker.tally import KeyTally

log = get_logger("bulk_tagger.run")

class Runner:
    """One command's run. ``await Runner(...).execute()`` returns the exit code."""

    def __init__(
        self,
        settings: RunSettings,
        *,
        kind: str,
        job: spec.Job | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.kind = kind  # "run" | "plan" | "undo"
        self.plans_only = kind == "plan" or settings.preview  # nothing is sent
        self.keys = KeyTally()  # a plan's changes per key
        self.job = job
        self.parent_run_id = parent_run_id
        self.journal: Journal | None = None
        self.run_lock: RunLock | None = None  # held from before the journal opens to the end
        self.client: api.Client | None = None
        self.pool: Pool | None = None
        self.latency = report.LatencyStats()
        self.retries = 0
        self.signals = 0
        self.interrupted = False
        self.resumed = False
        self.fatal: BaseException | None = None
        self.started_at = settings.clock()
        #: the summary of the process this one resumes (requests and time are added up)
        self.earlier: dict[str, Any] | None = None
        self.run_id = ""
        self.job_name = job.name if job else ""
        #: run --plan: the plan being applied (checked when the run opens)
        self.plan_ref: PlanRef | None = None
        if job is None and parent_run_id:  # undo: named after the job it undoes
            undone = read_run_info(settings.state_dir / parent_run_id)
            self.job_name = str(undone.get("job_name") or "")
        self.plan_reasons: Counter[str] = Counter()
        self.matched: dict[str, int] | None = None
        self.elsewhere: set[str] = set()  # selectors that matched only other shards' images
        self.known: Known | None = None
        self.retry_log = retry.RetryLog(log)
        self.samples: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        self.ctx = RunContext(run_id="", run_date=self.started_at.strftime("%Y-%m-%d"))
        self._body: asyncio.Task[int] | None = None
        # run-level limits over every call of the run (README, "Run-level budgets")
        #: the job's options; an undo (no job) runs with the defaults
        self.options = job.options if job else spec.Options()
        self.run_budget = RetryBudget(ratio=self.options.retry_budget_percent / 100)
        self.breaker = CircuitBreaker(consecutive=self.options.stop_after_failures)
        self._grace: asyncio.TimerHandle | None = None
        self._finishing = False

    # -- options --------------------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        if self.settings.concurrency is not None:
            return self.settings.concurrency
        return self.options.concurrency

    @property
    def rate_ceiling(self) -> float | None:
        rate = self.settings.rate
        if rate is None and self.job is not None:
            rate = self.job.options.rate_per_second
        if rate is not None and self.settings.shard is not None:
            rate = rate / self.settings.shard.count
        return rate

    def _retry_policy(self) -> retry.RetryPolicy:
        return retry.RetryPolicy(
            budget_s=self.options.retry_budget_seconds, base_s=self.settings.retry_base_s,
            max_wait_s=self.settings.retry_max_wait_s, run_budget=self.run_budget,
        )

    def _on_retry(self, exc: BaseException, delay: float) -> None:
        self.retries += 1
        self.retry_log(exc, delay)

    # -- the whole ------------------------------------------------------------------------
    async def execute(self) -> int:
        loop = asyncio.get_running_loop()
        self._body = asyncio.create_task(self._main())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._body
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            return await self._finish(ExitCode.INTERRUPTED)
        except (OSError, sqlite3.Error) as exc:  # a write that met a full or unwritable volume
            plain = statevol.volume_error(exc, self.settings.state_dir)
            if plain is None:
                raise
            raise plain from None
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self._release()

    def _discard_unstarted(self) -> None:
        """A new run the probe refused leaves no folder behind (nothing to resume, report)."""
        if not self.resumed and self.run_id:
            self._release()
            self.run_lock = None
            if not (self.settings.state_dir / self.run_id / "journal.sqlite").exists():
                shutil.rmtree(self.settings.state_dir / self.run_id, ignore_errors=True)

    def _release(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        assert self._body is not None
        if self._finishing:  # the record is being written: cancelling would only redo it
            log.warning("run.finishing", signal=sig.name)
            return
        if self.signals == 1:
            self.interrupted = True
            log.warning("run.stopping", signal=sig.name, grace_s=self.settings.grace_s)
            if self.pool is not None:
                self.pool.stop()
                self._grace = asyncio.get_running_loop().call_later(
                    self.settings.grace_s, self._body.cancel)
            else:
                self._body.cancel()
        else:
            log.warning("run.stopping_now", signal=sig.name)
            self._body.cancel()

    async def _main(self) -> int:
        async with self._api() as client:
            self.client = client
            self._choose_run()
            try:
                await self._preflight(client)
            except BaseException:
                self._discard_unstarted()
                raise
            self._open_journal()
            self._journal.track_process(self._counters, self.started_at)
            self._prune()
            self._journal.track_timeline(self._totals)
            self._journal.start_writer()
            try:
                code = await self._phases(client)
            except AuthFailed as exc:
                self.fatal = exc
                log.error("run.auth_failed", status=exc.status, error=exc.message)
                code = exc.exit_code
            except (SafetyLimit, CircuitOpen) as exc:
                self.fatal = exc
                code = exc.exit_code
            except ApiError as exc:  # a read unreachable past the retry budget, or unusable
                self.fatal = exc
                event = "run.bad_answer" if isinstance(exc, BadAnswer) else "run.api_unreachable"
                log.error(event, status=exc.status, error=exc.message)
                code = ExitCode.INTERRUPTED
            except JobError:
                await self._journal.stop_writer()
                raise
        if self.interrupted:
            code = ExitCode.INTERRUPTED
        return await self._finish(code)

    @contextlib.asynccontextmanager
    async def _api(self) -> AsyncIterator[api.Client]:
        settings = self.settings
        shards = self.settings.shard.count if self.settings.shard is not None else 1
        controller = RateController(self.rate_ceiling, share=1.0 / shards)
        limiter = AdaptiveLimiter(controller)
        api_settings = settings.api
        async with contextlib.AsyncExitStack() as stack:
            if settings.simulate:
                from worker.simulator import SimConfig, Simulator

                sim = await stack.enter_async_context(
                    Simulator(SimConfig(images=settings.simulate_images))
                )
                api_settings = api.Settings(
                    base_url=sim.url, api_key=api_settings.api_key or "demo-key",
                    connections=api_settings.connections,
                )
                log.info("run.simulating", url=sim.url, images=settings.simulate_images)
            api_settings = _with_connections(api_settings, self.concurrency)
            api_settings = replace(api_settings, request_timeout_s=min(
                api_settings.request_timeout_s, self._retry_policy().budget_s))
            client = await stack.enter_async_context(api.Client.open(api_settings, limiter))
            client.observe_latency = self.latency.add
            yield client

    async def _preflight(self, client: api.Client) -> None:
        """Before anything is written: the probe and the projects and regions the job names
        (``worker.preflight``). Raises what ends the command."""
        job = self.job if self.kind != "undo" else None
        self.known = await check_names(client, job, self._retry_policy(), self._on_retry)

    def _choose_run(self) -> None:
        """The run's id: a new one, ``--run-id``'s, or the run ``--resume`` continues (a
        refusal here comes before any request)."""
        settings = self.settings
        safety.state_dir(settings.state_dir)
        shard = str(settings.shard) if settings.shard else None
        if settings.plan_run_id is not None:  # refused before anything is made (exit 2)
            self.plan_ref = check_plan(settings.state_dir, settings.plan_run_id, job=self.job,
                                       shard=shard, max_age=settings.plan_max_age)
        job_hash = (self.job.sha256 if self.job else self.parent_run_id) or ""
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
                self._lock_run(found, latest=run_id is None)
                finished = read_run_info(settings.state_dir / found).get("exit_code")
                if run_id is None and finished not in (None, ExitCode.INTERRUPTED):
                    self._release()  # its holder finished it meanwhile: the next is new
                    self.run_lock = None
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
        if self.run_lock is None:
            self._check_space(None)  # a new run: refused before its folder is made
            safety.private_run_dir(settings.state_dir / run_id)
            self._lock_run(run_id)
        self.run_id = run_id

    def _open_journal(self) -> None:
        settings = self.settings
        run_id, shard = self.run_id, str(settings.shard) if settings.shard else None
        job_hash = (self.job.sha256 if self.job else self.parent_run_id) or ""
        journal = Journal(settings.state_dir / run_id)
        if self.resumed and journal.compacted:
            journal.close()
            raise JobError(f"run {run_id} has finished: there is nothing to resume",
                           field="--resume", hint="`bulk-tagger report` shows its record")
        if self.resumed:
            self._check_space(journal)
        run_started = self.started_at
        if self.resumed:
            info = journal.run_info()
            # what the earlier process recorded (none if it was killed before its end): the
            # summary adds this process to it; templates keep the run's first date
            self.earlier = info.get("summary") or None
            with contextlib.suppress(TypeError, ValueError):
                run_started = datetime.fromisoformat(str(info.get("started_at")))
            journal.reopen_run()
            log.info("run.resumed", run_id=run_id, counts=journal.counts())
        else:
            options = self.job.options.model_dump(mode="json") if self.job else {}
            options.update(concurrency=self.concurrency, rate_ceiling=self.rate_ceiling)
            journal.create_run(  # an undo's preview is a plan run (run --plan applies it)
                run_id=run_id, kind="plan" if settings.preview else self.kind,
                job_name=self.job_name,
                job_path=str(self.job.path) if self.job else None, job_hash=job_hash,
                options=options, parent_run_id=self.parent_run_id, shard=shard,
                started_at=now_iso(self.started_at),
            )
            log.info("run.started", run_id=run_id, kind=self.kind, job=self.job_name)
        self.ctx = RunContext(run_id=run_id, run_date=run_started.strftime("%Y-%m-%d"))
        self.journal = journal

    def _check_space(self, journal: Journal | None) -> None:
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

    def _lock_run(self, run_id: str, *, latest: bool = False) -> None:
        command = f"bulk-tagger {self.kind}" + (" --resume" if self.settings.resume else "")
        self.run_lock = RunLock.acquire(
            self.settings.state_dir / run_id, run_id=run_id, command=command, latest=latest
        )

    def _prune(self) -> None:
        """Retention: delete finished runs older than ``keep_days`` (README: "Retention")."""
        days = self.settings.keep_days
        if self.kind == "plan" or days <= 0:
            return
        try:
            result = retention.prune(self.settings.state_dir, older_than=timedelta(days=days),
                                     now=self.settings.clock(), exclude=self.run_id)
        except (OSError, ValueError) as exc:  # retention must never stop a run
            log.warning("retention.failed", error=str(exc))
            return
        if result.pruned or result.kept:
            log.info("retention.pruned", runs=[e.run_id for e in result.pruned],
                     bytes=result.bytes, keep_days=days,
                     kept={e.run_id: why for e, why in result.kept})

    async def _phases(self, client: api.Client) -> int:
        journal = self._journal
        if not (self.resumed and journal.run_info().get("plan_done")):
            state_dir = self.settings.state_dir
            if self.plan_ref is not None:
                await self._plan_again(plan_targets(
                    self._expander(client), state_dir / self.plan_ref.run_id))
            elif self.kind == "undo":
                await self._plan_again(undo_targets(
                    self._expander(client), state_dir / (self.parent_run_id or "")))
            else:
                await self._plan(client)
            await journal.flush()
            journal.mark_plan_done()
        self._check_limits()
        if self.plans_only:
            return ExitCode.OK
        await self._apply(client)
        counts = journal.counts()
        return ExitCode.FAILED if counts.get("failed") else ExitCode.OK

    @property
    def _journal(self) -> Journal:
        """The run's journal, open from the start of a run's phases to its end."""
        assert self.journal is not None
        return self.journal

    # -- plan -----------------------------------------------------------------------------
    def _record_plan(self, target: Target, expect: dict[str, Any] | None = None) -> None:
        journal = self._journal
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
            partial = bool(self.job and self.job.options.on_read_only == "partial")
            plan = plan_changes(image, target.changes, self.ctx, partial=partial)
            status, reason, detail, patch = plan.status, plan.reason, plan.detail, plan.patch
            before = image.state()
            name = image.name
            if self.plans_only:
                self.keys.add(before, patch or {}, kept=target.changes.add_tags)
                if patch is not None and len(self.samples) < self.settings.plan_samples:
                    self.samples.append((name, image.id, before, patch))
        if reason:
            self.plan_reasons[f"{status}:{reason}"] += 1
        journal.add_target(
            project_id=target.project_id, region_id=target.region_id,
            image_id=target.image_id, name=name, source=target.source,
            changes=target.changes, before=before, patch=patch,
            lock_task=image.task_id if image is not None else None,
            plan_status=status, plan_reason=reason, plan_detail=detail, expect=expect,
        )

    async def _plan(self, client: api.Client) -> None:
        assert self.job is not None
        settings = self.settings
        expander = Expander(
            self.job, client,
            stage_path=settings.state_dir / self.run_id / "stage.sqlite",
            policy=self._retry_policy(), concurrency=self.concurrency,
            shard=settings.shard, env=settings.env, on_retry=self._on_retry, known=self.known,
        )
        # progress while the selectors expand: images read of those the lists' counts and the
        # rows announce so far (the total grows as regions answer), and list pages read
        progress = Progress(stream=settings.progress, desc="planning", event="run.planning",
                            interval_s=settings.progress_s,
                            details=lambda: {"pages": client.counts.by_kind["list"]},
                            poll=lambda: (expander.read, expander.expected or None))
        async with progress.shown():
            async for target in expander.targets():
                self._record_plan(target)
                await self._journal.room()  # the writer behind: wait (memory stays flat)
        self.matched, self.elsewhere = dict(expander.matched), expander.elsewhere
        log.info("run.matched", selectors=self.matched)

    def _expander(self, client: api.Client) -> Expander:
        """An expander that reads given images again (no job): another run's targets, or a
        resumed run's own."""
        return Expander(
            None, client, stage_path=self.settings.state_dir / self.run_id / "stage.sqlite",
            policy=self._retry_policy(), concurrency=self.concurrency,
            on_retry=self._on_retry, page_size=self.options.page_size,
        )

    async def _plan_again(self, targets: AsyncIterator[Again]) -> None:
        """Another run's targets read again (undo: the run's updated ones; run --plan: the
        plan's planned ones), recorded as ``planrun`` decided."""
        journal = self._journal
        async for again in targets:
            await journal.room()  # as in _plan: the writer behind, the reading waits
            target, image = again.target, again.target.image
            if again.conflict is not None:
                self._record_conflict(target, again.name, again.conflict)
            elif again.patch is None or image is None:
                self._record_plan(target, expect=again.expect)
            else:  # the reviewed plan's own patch: what is sent is what was reviewed
                journal.add_target(
                    project_id=target.project_id, region_id=target.region_id,
                    image_id=target.image_id, name=image.name, source=target.source,
                    changes=target.changes, before=again.expect, patch=again.patch,
                    lock_task=image.task_id, plan_status="planned", plan_reason=None,
                    plan_detail=None, expect=again.expect)

    def _record_conflict(self, target: Target, name: str, detail: str) -> None:
        assert target.image is not None
        self.plan_reasons["skipped:conflict"] += 1
        self._journal.add_target(
            project_id=target.project_id, region_id=target.region_id,
            image_id=target.image_id, name=target.image.name or name, source=target.source,
            changes=target.changes, before=target.image.state(), patch=None, lock_task=None,
            plan_status="skipped", plan_reason="conflict", plan_detail=detail,
        )

    def _check_limits(self) -> None:
        options = self.job.options if self.job else None
        limit, percent = self.settings.max_changes, self.settings.max_changes_percent
        check_limits(
            self.matched, *self._journal.plan_counts(), elsewhere=self.elsewhere,
            require_matches=self.settings.require_matches or bool(
                options and options.require_matches),
            max_changes=limit if limit is not None or options is None else options.max_changes,
            max_changes_percent=percent if percent is not None or options is None
            else options.max_changes_percent,
        )

    # -- apply ----------------------------------------------------------------------------
    async def _apply(self, client: api.Client) -> None:
        journal = self._journal
        progress = apply.progress_of(journal, Progress(
            stream=self.settings.progress, interval_s=self.settings.progress_s),
            resumed=self.resumed)
        partial = bool(self.job and self.job.options.on_read_only == "partial")
        self.pool = apply.wire(
            client,
            PoolSettings(
                concurrency=self.concurrency, retry=self._retry_policy(),
                lock_timeout_s=self.options.lock_timeout_seconds,
                lock_poll_s=self.settings.lock_poll_s,
                partial=partial, on_retry=self.retry_log,
            ),
            self.ctx, journal=journal, progress=progress, breaker=self.breaker,
        )
        items = (apply.reread(journal, self._expander(client)) if self.resumed
                 else journal.iter_pending())
        await apply.run(self.pool, items, progress, reread=self.resumed)

    # -- the end --------------------------------------------------------------------------
    def _counters(self) -> tuple[dict[str, int], float]:
        """This process's requests by kind and the seconds it has run (journalled with every
        commit: a killed process's requests still count in the run's summary)."""
        requests: dict[str, int] = {}
        pool = self.pool
        if self.client is not None:
            requests.update(self.client.counts.by_kind)
            requests["rate_limited"] = self.client.counts.rate_limited
        requests["retries"] = self.retries + (pool.stats.retries if pool else 0)
        requests["lock_waits"] = pool.stats.lock_waits if pool else 0
        return requests, (self.settings.clock() - self.started_at).total_seconds()

    def _totals(self) -> tuple[tuple[int, ...], float]:
        """This process's running totals for the report's chart (worker.timeline.FIELDS) and
        the limiter's rate now."""
        client, pool = self.client, self.pool
        sent = limited = errors = 0
        if client is not None:
            counts = client.counts
            sent, limited, errors = counts.total, counts.rate_limited, counts.transient
        retries = self.retries + (pool.stats.retries if pool else 0)
        lock_waits = pool.stats.lock_waits if pool else 0
        rate = client.limiter_rate() if client is not None else 0.0
        return (sent, limited, errors, retries, lock_waits), rate

    async def _finish(self, code: int) -> int:
        journal = self.journal
        if journal is None:
            return code
        self._finishing = True
        if self._grace is not None:
            self._grace.cancel()
        await journal.stop_writer()
        counts = journal.counts()
        if code == ExitCode.OK and counts.get("failed"):
            code = ExitCode.FAILED
        finished = self.settings.clock()
        requests, _ = self._counters()
        # every process that worked the run before this one, killed ones too (journalled)
        earlier = journal.earlier_processes() or self.earlier
        extra: dict[str, Any] = {"kind": self.kind}
        if self.settings.shard:
            extra["shard"] = str(self.settings.shard)
        if self.parent_run_id:
            extra["parent_run_id"] = self.parent_run_id
        if self.settings.plan_run_id or self.settings.preview:
            extra.update(plan_run_id=self.settings.plan_run_id, preview=self.settings.preview)
        if self.plans_only:
            extra["changes_per_key"] = self.keys.as_json()
        if self.fatal is not None:
            extra["error"] = scrub(str(self.fatal))
        if self.client is not None:
            extra["rate_limit_final"] = round(self.client.limiter_rate(), 2)
        # the folder at its largest (the whole journal), before the record is compacted: what
        # the next run of this job measures its need on the state volume by
        extra["record_bytes_peak"] = statevol.folder_bytes(journal.run_dir)
        # a resumed run planned by an earlier process: that one's
        matched = self.matched if self.matched is not None else (self.earlier or {}).get("matched")
        if matched is not None:
            extra["matched"] = matched
        extra["reasons"] = journal.reasons()
        summary = report.build_summary(
            run_id=self.run_id, job=self.job_name, started_at=self.started_at,
            finished_at=finished, exit_code=code, counts=counts, requests=requests,
            latency=self.latency, extra=extra, earlier=earlier,
        )
        run_dir = journal.run_dir
        rows = await asyncio.to_thread(
            exports.write_exports, run_dir, journal.iter_results(self.run_id, raw=True), summary
        )
        for stale in ("results.jsonl", "results.csv"):  # an earlier `report --export`'s
            (run_dir / stale).unlink(missing_ok=True)
        # finished only once the exports exist: a kill while writing them leaves the run
        # resumable, and the resume writes them
        journal.finish_run(code, summary, now_iso(finished))
        if code != ExitCode.INTERRUPTED:
            # finished for good: results.jsonl.gz is the targets' record from now on
            await asyncio.to_thread(journal.compact, rows)
        journal.close()
        self._release()
        text: list[str] = []  # for a person: control characters (names, tags) escaped
        if self.plans_only:
            # counts from the journal: a target named twice is planned once
            text.append(report.format_plan(
                counts, self.plan_reasons, self.samples,
                max(0, counts.get("planned", 0) - len(self.samples)), self.keys.lines(),
            ))
        if isinstance(self.fatal, BulkTaggerError) and not isinstance(self.fatal, ApiError):
            text.append(f"stopped: {scrub(str(self.fatal))}")
        text += [report.format_summary(summary, targets=self.kind != "plan"),
                 f"report: {run_dir}",
                 f"  results.jsonl.gz and summary.json there; `bulk-tagger report "
                 f"{self.run_id} --format jsonl|csv|json` prints them"]
        out = self.settings.out
        out.write("".join(safety.printable(line, newlines=True) + "\n" for line in text))
        out.flush()
        log.info("run.finished", run_id=self.run_id, exit_code=code, counts=counts)
        if self.settings.pushgateway and not self.plans_only:
            await asyncio.to_thread(
                push_metrics, self.settings.pushgateway, self.job_name, summary,
                success=code == 0, latency=self.latency,
                shard=(shard.index, shard.count) if (shard := self.settings.shard) else None,
            )
        return code


def _with_connections(settings: api.Settings, concurrency: int) -> api.Settings:
    return replace(settings, connections=max(settings.connections, concurrency + 4))

"""A run from end to end: the stages (README, "How it is built") wired together for ``run``,
``plan`` and ``undo`` (the CLI only parses and calls these).

``run`` is plan, then apply: the whole plan is streamed into the journal first (so a bad row
deep in a file, or a plan over the safety limit, stops the run before any PATCH), then the
apply phase streams the planned targets back out of the journal into the pool. The run's
folder is chosen, locked and its journal opened by ``worker.runfolder``; the plan phase
records into the journal through ``planrun.Recorder``; the apply phase is ``worker.apply``;
``worker.runend`` writes the record at the end and the text a person reads.

Signals: the first SIGTERM/SIGINT stops taking targets and lets in-flight ones finish for at
most ``grace_s``; a second one stops at once. Either way the journal is committed, the
exports written, and the exit code is 75 (``--resume`` goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

from worker import api, apply, report, retention, retry, runend, spec, statevol
from worker.budget import CircuitBreaker, RetryBudget
from worker.errors import (
    ApiError,
    AuthFailed,
    BadAnswer,
    CircuitOpen,
    ExitCode,
    JobError,
    SafetyLimit,
)
from worker.journal import Journal, read_run_info
from worker.limiter import RateController
from worker.log import get_logger, scrub
from worker.metrics import push_metrics
from worker.models import RunContext
from worker.pacer import AdaptiveLimiter
from worker.planrun import Recorder, plan_targets, undo_targets
from worker.pool import Pool, PoolSettings
from worker.preflight import check_limits, check_names
from worker.progress import Progress
from worker.runfolder import RunFolder
from worker.runsettings import RunSettings
from worker.selectors import Expander, Known

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
        self.job = job
        self.parent_run_id = parent_run_id
        self.journal: Journal | None = None
        self.recorder: Recorder | None = None  # made with the journal
        self.client: api.Client | None = None
        self.pool: Pool | None = None
        self.latency = report.LatencyStats()
        self.retries = 0
        self.signals = 0
        self.interrupted = False
        self.fatal: BaseException | None = None
        self.started_at = settings.clock()
        self.job_name = job.name if job else ""
        if job is None and parent_run_id:  # undo: named after the job it undoes
            undone = read_run_info(settings.state_dir / parent_run_id)
            self.job_name = str(undone.get("job_name") or "")
        #: its folder: chosen, locked to the end, its journal opened (worker.runfolder)
        self.folder = RunFolder(settings, kind=kind, job=job, job_name=self.job_name,
                                parent_run_id=parent_run_id, started_at=self.started_at)
        self.matched: dict[str, int] | None = None
        self.elsewhere: set[str] = set()  # selectors that matched only other shards' images
        self.known: Known | None = None
        self.retry_log = retry.RetryLog(log)
        self.ctx = RunContext(run_id="", run_date=self.started_at.strftime("%Y-%m-%d"))
        self._body: asyncio.Task[int] | None = None
        # run-level limits over every call of the run (README, "Run-level budgets")
        #: the job's options; an undo (no job) runs with the defaults
        self.options = job.options if job else spec.Options()
        self.run_budget = RetryBudget(ratio=self.options.retry_budget_percent / 100)
        self.breaker = CircuitBreaker(consecutive=self.options.stop_after_failures)
        self._grace: asyncio.TimerHandle | None = None
        self._finishing = False

    @property
    def run_id(self) -> str:
        return self.folder.run_id

    @property
    def resumed(self) -> bool:
        return self.folder.resumed

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

    @property
    def partial(self) -> bool:
        """``on_read_only: partial``: a read-only tag skipped, the rest of the change made."""
        return bool(self.job and self.job.options.on_read_only == "partial")

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
            self.folder.release()

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
            self.folder.choose()
            try:
                await self._preflight(client)
            except BaseException:
                self.folder.discard_unstarted()
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

    def _open_journal(self) -> None:
        options = self.job.options.model_dump(mode="json") if self.job else {}
        options.update(concurrency=self.concurrency, rate_ceiling=self.rate_ceiling)
        self.journal = self.folder.open_journal(options)
        self.ctx = RunContext(run_id=self.run_id,
                              run_date=self.folder.run_started.strftime("%Y-%m-%d"))
        self.recorder = Recorder(self.journal, self.ctx, partial=self.partial,
                                 tally=self.plans_only, max_samples=self.settings.plan_samples)

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
            if self.folder.plan_ref is not None:
                await self._recorder.again(plan_targets(
                    self._expander(client), state_dir / self.folder.plan_ref.run_id))
            elif self.kind == "undo":
                await self._recorder.again(undo_targets(
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

    @property
    def _recorder(self) -> Recorder:
        """What plans into the journal (made when the journal opens)."""
        assert self.recorder is not None
        return self.recorder

    # -- plan -----------------------------------------------------------------------------
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
            await self._recorder.targets(expander.targets())
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
        self.pool = apply.wire(
            client,
            PoolSettings(
                concurrency=self.concurrency, retry=self._retry_policy(),
                lock_timeout_s=self.options.lock_timeout_seconds,
                lock_poll_s=self.settings.lock_poll_s,
                partial=self.partial, on_retry=self.retry_log,
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
        recorder = self._recorder
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
        earlier = journal.earlier_processes() or self.folder.earlier
        extra: dict[str, Any] = {"kind": self.kind}
        if self.settings.shard:
            extra["shard"] = str(self.settings.shard)
        if self.parent_run_id:
            extra["parent_run_id"] = self.parent_run_id
        if self.settings.plan_run_id or self.settings.preview:
            extra.update(plan_run_id=self.settings.plan_run_id, preview=self.settings.preview)
        if self.plans_only:
            extra["changes_per_key"] = recorder.keys.as_json()
        if self.fatal is not None:
            extra["error"] = scrub(str(self.fatal))
        if self.client is not None:
            extra["rate_limit_final"] = round(self.client.limiter_rate(), 2)
        # the folder at its largest (the whole journal), before the record is compacted: what
        # the next run of this job measures its need on the state volume by
        extra["record_bytes_peak"] = statevol.folder_bytes(journal.run_dir)
        # a resumed run planned by an earlier process: that one's
        matched = self.matched
        if matched is None:
            matched = (self.folder.earlier or {}).get("matched")
        if matched is not None:
            extra["matched"] = matched
        extra["reasons"] = journal.reasons()
        summary = report.build_summary(
            run_id=self.run_id, job=self.job_name, started_at=self.started_at,
            finished_at=finished, exit_code=code, counts=counts, requests=requests,
            latency=self.latency, extra=extra, earlier=earlier,
        )
        await runend.write_record(journal, run_id=self.run_id, code=code, summary=summary,
                                  finished_at=finished)
        self.folder.release()
        out = self.settings.out
        out.write(runend.end_text(
            summary, journal=journal, run_id=self.run_id, kind=self.kind, counts=counts,
            plan=recorder if self.plans_only else None, fatal=self.fatal))
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

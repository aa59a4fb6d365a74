"""The pool: N workers over a bounded queue send each target's PATCH, and each target ends
as exactly one outcome (data, handed to ``sink``), never an exception.

- Every HTTP attempt takes a limiter slot (inside ``api.Client``); retries go through
  ``worker.retry`` (one table of what is retried).
- A target whose image is locked by a task (``Locked``: 409, or a ``task_id`` seen when it was
  read) is parked: a task of its own polls the lock's task with backoff, without holding a
  worker slot, then reads the image again, plans again against what the task left, and goes
  back in the queue. Past ``lock_timeout_s`` it ends ``failed`` / ``lock_timeout``.
- A target flagged ``reread`` (a resumed run) is read and planned again before it is sent.
- ``AuthFailed`` stops the whole pool at once (nothing more is sent); it is re-raised by ``run``.
- ``stop()`` (a signal) stops taking targets; in-flight ones finish (the caller bounds that by
  its grace period and then cancels ``run``). Targets never taken keep no outcome: they stay
  pending in the journal for ``--resume``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from worker import retry
from worker.api import Client
from worker.errors import (
    ApiError,
    AuthFailed,
    BulkTaggerError,
    Locked,
    NotFound,
    RateLimited,
    Rejected,
)
from worker.journal import Pending
from worker.log import get_logger
from worker.models import Image, Outcome, RunContext
from worker.plan import plan_changes, shows

log = get_logger("bulk_tagger.pool")

_TASK_DONE = frozenset({"FINISHED", "ERROR"})

Sink = Callable[[int, Outcome], None]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How the pool works. Seconds."""

    concurrency: int = 16
    retry: retry.RetryPolicy = field(default_factory=retry.RetryPolicy)
    lock_timeout_s: float = 900.0
    lock_poll_s: float = 1.0
    lock_poll_max_s: float = 30.0
    partial: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.lock_timeout_s <= 0 or self.lock_poll_s <= 0:
            raise ValueError("lock timeout and poll interval must be > 0 seconds")


@dataclass(slots=True)
class PoolStats:
    retries: int = 0
    lock_waits: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


@dataclass(slots=True)
class _Work:
    item: Pending
    started: float
    attempts: int = 0
    lock_wait_s: float = 0.0
    reread: bool = False
    lock_task: str | None = None
    lock_since: float | None = None


class Pool:
    def __init__(
        self,
        client: Client,
        settings: PoolSettings,
        ctx: RunContext,
        sink: Sink,
        *,
        observe: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.ctx = ctx
        self.sink = sink
        self.observe = observe
        self.stats = PoolStats()
        self._queue: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=settings.concurrency * 2)
        self._parked: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._fatal: BaseException | None = None
        self._feeder: asyncio.Task[None] | None = None

    # -- control ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Take no more targets; parked ones are dropped (they stay pending)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for task in list(self._parked):
            task.cancel()
        if self._feeder is not None:
            self._feeder.cancel()
        # workers finish what they hold, then find a None: drop what waits in the queue
        while True:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
        for _ in range(self.settings.concurrency):
            self._queue.put_nowait(None)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self, items: Iterable[Pending], *, reread: bool = False) -> None:
        """Send every item; returns when all have an outcome, or after stop()."""
        workers = [
            asyncio.create_task(self._worker(), name=f"pool-worker-{i}")
            for i in range(self.settings.concurrency)
        ]
        feeder = self._feeder = asyncio.create_task(self._feed(items, reread), name="pool-feeder")
        try:
            await self._supervise(workers)
        finally:
            for task in [*workers, feeder, *self._parked]:
                task.cancel()
            await asyncio.gather(*workers, feeder, *self._parked, return_exceptions=True)
        if self._fatal is not None:
            raise self._fatal

    async def _supervise(self, workers: list[asyncio.Task[None]]) -> None:
        pending: set[asyncio.Task[None]] = set(workers)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if exc is not None:
                    self._fatal = self._fatal or exc
                    self.stop()
                    return

    async def _feed(self, items: Iterable[Pending], reread: bool) -> None:
        queue = self._queue
        now = time.monotonic
        for item in items:
            if self.stopping:
                break
            await queue.put(
                _Work(item, now(), reread=reread, lock_task=item.lock_task,
                      lock_since=now() if item.lock_task else None)
            )
        # parked targets come back through the queue: wait for them before closing it
        while self._parked and not self.stopping:
            await asyncio.wait(set(self._parked))
        for _ in range(self.settings.concurrency):
            await queue.put(None)

    async def _worker(self) -> None:
        queue = self._queue
        stats = self.stats
        while True:
            work = await queue.get()
            if work is None or self.stopping:
                return
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                await self._process(work)
            finally:
                stats.in_flight -= 1

    # -- one target ---------------------------------------------------------------------------
    def _emit(self, work: _Work, outcome: Outcome) -> None:
        self.sink(work.item.seq, outcome)
        if self.observe is not None:
            self.observe(outcome)

    def _outcome(self, work: _Work, status: str, **fields: Any) -> Outcome:
        item = work.item
        return Outcome(
            project_id=item.project_id,
            region_id=item.region_id,
            image_id=item.image_id,
            name=item.name,
            status=status,
            before=fields.pop("before", item.before),
            patch=fields.pop("patch", item.patch),
            attempts=work.attempts,
            lock_wait_s=round(work.lock_wait_s, 3),
            duration_ms=int((time.monotonic() - work.started) * 1000),
            **fields,
        )

    def _on_retry(self, exc: BaseException, delay: float) -> None:
        self.stats.retries += 1
        log.debug("target.retry_scheduled", error=type(exc).__name__, delay_s=round(delay, 3))

    async def _call(self, work: _Work, fn: Callable[[], Any]) -> Any:
        def counted() -> Any:
            work.attempts += 1
            return fn()

        result, _ = await retry.call(counted, self.settings.retry, on_retry=self._on_retry)
        return result

    async def _process(self, work: _Work) -> None:
        try:
            if (work.lock_task is None and not work.reread) or await self._refresh(work):
                await self._send(work)
        except AuthFailed:
            raise
        except Locked as exc:
            self._park(work, exc.task_id)
        except NotFound as exc:
            self._emit(work, self._outcome(work, "failed", reason="not_found",
                                           http_status=exc.status, error=exc.message))
        except Rejected as exc:
            self._emit(work, self._outcome(work, "failed", reason="rejected",
                                           http_status=exc.status, error=exc.message))
        except (RateLimited, ApiError) as exc:  # retryable, past its budget
            reason = "rate_limited" if isinstance(exc, RateLimited) else "unreachable"
            self._emit(work, self._outcome(work, "failed", reason=reason,
                                           http_status=exc.status, error=exc.message))
        except BulkTaggerError:
            raise

    async def _send(self, work: _Work) -> None:
        item = work.item
        patch = item.patch or {}
        client = self.client
        image: Image = await self._call(
            work,
            lambda: client.patch_image(item.project_id, item.region_id, item.image_id, patch),
        )
        state = image.state()
        if shows(state, patch):
            self._emit(work, self._outcome(work, "updated", after=state, http_status=200))
            return
        # the answer does not show the change: read again before saying anything
        image = await self._call(
            work, lambda: client.get_image(item.project_id, item.region_id, item.image_id)
        )
        state = image.state()
        if shows(state, patch):
            self._emit(work, self._outcome(work, "updated", reason="verified_by_read",
                                           after=state, http_status=200))
        else:
            self._emit(work, self._outcome(
                work, "failed", reason="not_applied", after=state, http_status=200,
                error="the PATCH succeeded but the image does not show the change"))

    async def _refresh(self, work: _Work) -> bool:
        """Read the image again (after a lock, or on resume) and plan again.

        Returns True when ``work`` now holds a patch to send; otherwise it has ended
        (outcome emitted) or been parked.
        """
        item = work.item
        client = self.client
        if work.lock_task is not None:
            self._park(work, work.lock_task)
            return False
        image: Image = await self._call(
            work, lambda: client.get_image(item.project_id, item.region_id, item.image_id)
        )
        if image.task_id:
            self._park(work, image.task_id)
            return False
        work.reread = False
        plan = plan_changes(image, item.changes, self.ctx, partial=self.settings.partial)
        before = image.state()
        if plan.patch is None:
            status = plan.status if plan.status != "planned" else "unchanged"
            self._emit(work, self._outcome(work, status, reason=plan.reason, before=before,
                                           patch=None, error=plan.detail))
            return False
        work.item = replace(item, before=before, patch=plan.patch, name=image.name or item.name)
        return True

    # -- task locks ---------------------------------------------------------------------------
    def _park(self, work: _Work, task_id: str | None) -> None:
        if self.stopping:
            return
        if work.lock_since is None:
            work.lock_since = time.monotonic()
            self.stats.lock_waits += 1
        work.lock_task = task_id
        task = asyncio.create_task(self._wait_lock(work))
        self._parked.add(task)
        task.add_done_callback(self._parked.discard)

    async def _wait_lock(self, work: _Work) -> None:
        settings = self.settings
        assert work.lock_since is not None
        deadline = work.lock_since + settings.lock_timeout_s
        delay = settings.lock_poll_s
        task_id = work.lock_task
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    work.lock_wait_s = now - work.lock_since
                    self._emit(work, self._outcome(
                        work, "failed", reason="lock_timeout", http_status=409,
                        error=f"image locked by task {task_id} for over "
                        f"{settings.lock_timeout_s:g} s"))
                    return
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, settings.lock_poll_max_s)
                if task_id is None:
                    break  # no task named: just read the image again
                try:
                    task = await self._call(work, lambda: self.client.get_task(task_id))
                except NotFound:
                    break
                if str(task.get("state", "")).upper() in _TASK_DONE:
                    break
            work.lock_wait_s = time.monotonic() - work.lock_since
            work.lock_task = None
            work.reread = True
            await self._queue.put(work)
        except AuthFailed as exc:
            self._fatal = self._fatal or exc
            self.stop()
        except ApiError as exc:
            self._emit(work, self._outcome(work, "failed", reason="unreachable",
                                           http_status=exc.status, error=exc.message))

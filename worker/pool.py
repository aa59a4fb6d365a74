"""The pool: N workers over a bounded queue send each target's PATCH, and each target ends
as exactly one outcome (data, handed to ``sink``), never an exception.

- Every HTTP attempt takes a limiter slot (inside ``api.Client``); retries go through
  ``worker.retry`` (one table of what is retried).
- A target whose image is locked by a task (``Locked``: 409, or a ``task_id`` seen when it was
  read) is parked: a task of its own polls the lock's task with backoff, without holding a
  worker slot, then the target goes back in the queue to be read again, planned again against
  what the task left, and sent. Past ``lock_timeout_s`` it ends ``failed`` / ``lock_timeout``.
- A target flagged ``reread`` (a resumed run) is read and planned again before it is sent;
  one whose ``Pending.read`` is set was read just now (by a list page) and is planned again
  against that image without a GET of its own.
- ``AuthFailed`` stops the whole pool at once (the client sends nothing more); ``run``
  re-raises it. So does a retryable error that outlived its budget while the API answered
  nothing at all with a 2xx: the API is unreachable, the run stops (exit 75) and the target
  stays pending for ``--resume``, instead of every target failing one by one.
- ``stop()`` (a signal) stops taking targets, cuts retry waits, lock waits and waits for a
  rate-limiter slot short; requests in flight finish and keep their outcome (the caller
  bounds that by its grace period, then cancels ``run``). Targets without an outcome stay
  pending in the journal for ``--resume``.

A PATCH may land without our hearing so (the answer lost after the write, a timeout, a 5xx;
or a resumed run whose last process died before the outcome was committed). Such a target,
when read again (after a lock, on resume, or once its retries ran out), is recorded
``updated`` / ``verified_by_read`` with the state and patch it was sent against if the image
shows that patch: the record never denies a change the run made (and ``undo`` reverts it).

Outcome reasons set here: ``verified_by_read`` (updated, seen by a read), ``not_found``,
``rejected`` (400/403/422...), ``lock_timeout``, ``not_applied`` (the PATCH succeeded but a
read shows otherwise), ``rate_limited``, ``server_error`` and ``unreachable`` (429s, 408/5xx,
or no answer, past the retry budget), ``conflict`` (skipped: an undo target whose image no
longer shows ``Pending.expect``), ``internal_error`` (a bug: logged with its traceback, the
run goes on).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from worker import defaults, retry
from worker.api import Client
from worker.errors import (
    ApiError,
    AuthFailed,
    BadAnswer,
    BulkTaggerError,
    Locked,
    NotFound,
    RateLimited,
    Rejected,
    Transient,
)
from worker.journal import Pending
from worker.log import get_logger
from worker.models import Image, Outcome, RunContext
from worker.plan import plan_changes, shows

log = get_logger("bulk_tagger.pool")

_TASK_DONE = frozenset({"FINISHED", "ERROR"})

T = TypeVar("T")
Sink = Callable[[int, Outcome], None]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How the pool works. Seconds.

    ``lock_poll_s`` is the first wait before a locked image's task is polled; waits double
    up to ``lock_poll_max_s``. ``partial`` plans with ``on_read_only: partial``.
    """

    concurrency: int = defaults.CONCURRENCY
    retry: retry.RetryPolicy = field(default_factory=retry.RetryPolicy)
    lock_timeout_s: float = defaults.LOCK_TIMEOUT_S
    lock_poll_s: float = defaults.LOCK_POLL_S
    lock_poll_max_s: float = 30.0
    partial: bool = False
    #: told of every retry the pool schedules (error, wait): the run's info log of retries
    on_retry: Callable[[BaseException, float], None] | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.lock_timeout_s <= 0 or self.lock_poll_s <= 0 or self.lock_poll_max_s <= 0:
            raise ValueError("lock timeout and poll intervals must be > 0 seconds")


@dataclass(slots=True)
class PoolStats:
    """Counters of a pool's life; ``in_flight``: targets a worker holds now."""

    retries: int = 0
    lock_waits: int = 0
    parked: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


@dataclass(slots=True)
class _Work:
    item: Pending
    started: float = 0.0
    attempts: int = 0
    lock_wait_s: float = 0.0
    reread: bool = False
    lock_task: str | None = None
    lock_since: float | None = None
    # a PATCH of this target may have been applied without our hearing so (an answer lost,
    # a timeout, a 5xx; or a resumed run, whose last process may have sent it before it died)
    maybe_applied: bool = False


class _ApiDown(Exception):
    """A retryable error outlived its budget and the API answered nothing meanwhile."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class Pool:
    """``await Pool(client, settings, ctx, sink).run(items)`` sends every item."""

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
        self._sleepers: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._fatal: BaseException | None = None
        self._feeder: asyncio.Task[None] | None = None
        # targets taken from ``items`` that have no outcome yet; ``_drained`` is set when
        # the feed is over and that count is zero
        self._open = 0
        self._fed_all = False
        self._drained = asyncio.Event()

    # -- control ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Take no more targets; cut retry and lock waits short (those targets stay pending).

        Requests in flight finish and keep their outcome. Safe to call more than once.
        """
        if self._stopping:
            return
        self._stopping = True
        for task in [*self._parked, *self._sleepers]:
            task.cancel()
        self.client.limiter.cancel_waiting()  # not yet sent: stays pending
        if self._feeder is not None:
            self._feeder.cancel()
        # drop what waits in the queue, then wake every idle worker
        while True:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
        for _ in range(self.settings.concurrency):
            self._queue.put_nowait(None)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def abort(self, exc: BaseException) -> None:
        """Stop as ``stop()`` does, and make ``run`` raise ``exc`` (the first one wins): for
        what ends the whole run (a 401, an unreachable API, a circuit breaker's trip)."""
        self._fatal = self._fatal or exc
        self.stop()

    async def run(
        self, items: Iterable[Pending] | AsyncIterable[Pending], *, reread: bool = False
    ) -> None:
        """Send every item; returns when all have an outcome, or after ``stop()``.

        Raises ``AuthFailed`` (or the ``ApiError`` of an unreachable API) that stopped it.
        """
        workers = [
            asyncio.create_task(self._worker(), name=f"pool-worker-{i}")
            for i in range(self.settings.concurrency)
        ]
        feeder = self._feeder = asyncio.create_task(self._feed(items, reread), name="pool-feeder")
        try:
            await self._supervise([*workers, feeder])
        finally:
            for task in [*workers, feeder, *self._parked]:
                task.cancel()
            await asyncio.gather(*workers, feeder, *self._parked, return_exceptions=True)
        if self._fatal is not None:
            raise self._fatal

    async def _supervise(self, tasks: list[asyncio.Task[None]]) -> None:
        """Until every worker has returned; a task that died of an error (a bug outside any
        one target, or the items' source failing) stops the run with that error."""
        pending: set[asyncio.Task[None]] = set(tasks)
        workers = set(tasks[:-1])
        while pending & workers:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if exc is not None:
                    self.abort(exc)
                    return

    async def _feed(self, items: Iterable[Pending] | AsyncIterable[Pending], reread: bool) -> None:
        queue = self._queue
        if isinstance(items, AsyncIterable):
            async for item in items:
                if self._stopping:
                    return
                self._open += 1
                # read just now: its lock, if any, shows in that read
                await queue.put(_Work(item, reread=reread, maybe_applied=reread))
        else:
            for item in items:
                if self._stopping:
                    return
                self._open += 1
                work = _Work(item, reread=reread, maybe_applied=reread)
                if item.lock_task:
                    work.lock_task = item.lock_task
                await queue.put(work)
        self._fed_all = True
        if self._open == 0:
            self._drained.set()
        # parked targets come back through the queue: close it only when every target ended
        await self._drained.wait()
        for _ in range(self.settings.concurrency):
            await queue.put(None)

    async def _worker(self) -> None:
        queue = self._queue
        stats = self.stats
        now = time.monotonic
        while True:
            work = await queue.get()
            if work is None or self._stopping:
                return
            if not work.started:
                work.started = now()
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
        self._open -= 1
        if self._open == 0 and self._fed_all:
            self._drained.set()

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

    def _fail(self, work: _Work, exc: ApiError) -> None:
        self._emit(work, self._outcome(work, "failed", reason=_reason(exc),
                                       http_status=exc.status, error=exc.message))

    def _on_retry(self, exc: BaseException, delay: float) -> None:
        self.stats.retries += 1
        log.debug("target.retry_scheduled", error=type(exc).__name__, delay_s=round(delay, 3))
        if self.settings.on_retry is not None:
            self.settings.on_retry(exc, delay)

    async def _sleep(self, delay: float) -> None:
        """A retry's wait, which ``stop()`` cuts short (by cancelling the waiting task)."""
        task = asyncio.current_task()
        assert task is not None
        self._sleepers.add(task)
        try:
            await asyncio.sleep(delay)
        finally:
            self._sleepers.discard(task)

    async def _call(self, work: _Work, fn: Callable[[], Awaitable[T]]) -> T:
        def counted() -> Awaitable[T]:
            work.attempts += 1
            return fn()

        since = time.monotonic()
        try:
            result, _ = await retry.call(
                counted, self.settings.retry, on_retry=self._on_retry, sleep=self._sleep
            )
        except ApiError as exc:
            if exc.retryable:
                last_ok = self.client.last_ok
                if last_ok is None or last_ok < since:
                    raise _ApiDown(exc) from exc
            raise
        return result

    async def _process(self, work: _Work) -> None:
        try:
            fresh = work.lock_task is None and not work.reread and work.item.patch
            if fresh or await self._refresh(work):
                await self._send(work)
        except Locked as exc:
            self._park(work, exc.task_id)
        except AuthFailed as exc:
            self.abort(exc)
        except ApiError as exc:  # not found, rejected, or retryable past its budget
            maybe = exc.retryable or isinstance(exc, BadAnswer)
            if not (maybe and work.maybe_applied and await self._landed(work)):
                self._fail(work, exc)
        except _ApiDown as down:
            log.error("run.api_unreachable", error=down.error.message, status=down.error.status)
            self.abort(down.error)
        except BulkTaggerError:
            raise
        except Exception as exc:  # a bug: this target fails, the run goes on
            log.exception("target.internal_error", image_id=work.item.image_id)
            self._emit(work, self._outcome(work, "failed", reason="internal_error",
                                           error=f"{type(exc).__name__}: {exc}"))

    async def _send(self, work: _Work) -> None:
        item = work.item
        patch = item.patch or {}
        client = self.client
        p, r, image_id = item.project_id, item.region_id, item.image_id

        async def attempt() -> Image:
            try:
                return await client.patch_image(p, r, image_id, patch)
            except Transient:
                work.maybe_applied = True
                raise
            except BadAnswer as exc:  # a 2xx whose body is unusable: the PATCH may be in
                work.maybe_applied = exc.status is not None
                raise

        image: Image = await self._call(work, attempt)
        state = image.state()
        if shows(state, patch):
            self._emit(work, self._outcome(work, "updated", after=state, http_status=200))
            return
        # the answer does not show the change: read again before saying anything
        image = await self._call(work, lambda: client.get_image(p, r, image_id))
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
        image: Image | None
        if item.read:  # read again by a list page just now (a resumed run): used once
            image, work.item = item.image, replace(item, image=None, read=False)
            item = work.item
            if image is None:
                raise NotFound("no such image (it was deleted since the plan)", status=404)
        else:
            image = await self._call(
                work, lambda: client.get_image(item.project_id, item.region_id, item.image_id)
            )
        if image.task_id:
            self._park(work, image.task_id)
            return False
        work.reread = False
        before = image.state()
        if work.maybe_applied and item.patch and shows(before, item.patch):
            # our own PATCH landed (its answer was lost, or the last process died before its
            # outcome was committed): say so, with the state and patch it was sent against
            self._emit(work, self._outcome(work, "updated", reason="verified_by_read",
                                           after=before, http_status=200))
            return False
        if item.expect is not None and not shows(before, item.expect):
            # undo: the image no longer shows what the run set; someone changed it since
            self._emit(work, self._outcome(
                work, "skipped", reason="conflict", before=before, patch=None,
                error="the image no longer shows what the run set: changed since"))
            return False
        plan = plan_changes(image, item.changes, self.ctx, partial=self.settings.partial)
        if plan.patch is None:
            status = plan.status if plan.status != "planned" else "unchanged"
            self._emit(work, self._outcome(work, status, reason=plan.reason, before=before,
                                           patch=None, error=plan.detail))
            return False
        work.item = replace(item, before=before, patch=plan.patch, name=image.name or item.name)
        return True

    async def _landed(self, work: _Work) -> bool:
        """After retries ran out on a PATCH that may have been applied: one read to tell.

        True when the image shows the patch (the target then ends ``updated``).
        """
        item = work.item
        try:
            work.attempts += 1
            image = await self.client.get_image(item.project_id, item.region_id, item.image_id)
        except AuthFailed:
            raise
        except ApiError:
            return False
        state = image.state()
        if not (item.patch and shows(state, item.patch)):
            return False
        self._emit(work, self._outcome(work, "updated", reason="verified_by_read", after=state,
                                       http_status=200))
        return True

    # -- task locks ---------------------------------------------------------------------------
    def _park(self, work: _Work, task_id: str | None) -> None:
        """Wait for the lock in a task of its own: the worker slot is free at once."""
        if self._stopping:
            return
        if work.lock_since is None:
            work.lock_since = time.monotonic()
            self.stats.lock_waits += 1
        work.lock_task = task_id
        self.stats.parked += 1
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
            self.abort(exc)
        except _ApiDown as down:
            self.abort(down.error)
        except ApiError as exc:
            self._fail(work, exc)


def _reason(exc: ApiError) -> str:
    """The outcome reason of an error that ends a target."""
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, Rejected):
        return "rejected"
    if isinstance(exc, BadAnswer):
        return "bad_answer"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, Locked):
        return "lock_timeout"
    return "server_error" if exc.status else "unreachable"

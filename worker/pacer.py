"""The pool's slots: evenly spaced at a rate that changes in place (``Pacer``), driven by the
rate the API's answers call for (``AdaptiveLimiter``, over a ``worker.limiter.RateController``).

``Pacer`` hands out slots evenly spaced at its rate (GCRA: one theoretical time of the next slot),
first come first served, waking the waiters a slot at a time from a single timer; after an
idle spell it lets ``capacity`` slots through at once, no more (no start-up burst). Its rate
changes in place: the next slot keeps the new spacing from the last one given, and a waiter
already queued sees the change at once.

Why not aiolimiter, the project's named limiter: it has no public way to change a rate in
place (a limiter replaced at each change would strand its waiters at the old rate), and its
waiters are not served in order. Its documented use, a fixed ``AsyncLimiter``, is what the
bench's floor and SDK contenders run.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping

from worker import rate_headers
from worker.limiter import CEILING_BURST_SHARE, RateController
from worker.log import get_logger

log = get_logger("bulk_tagger.limiter")

#: the shortest wait a timer is armed for where missed slots are caught up (see ``_arm``)
_TICK_S = 0.001
#: slots missed by a wake-up this late are given at once (a found rate; none under --rate)
_CATCHUP_S = 0.02


class Pacer:
    """Slots evenly spaced at ``rate``, first come first served; at most ``capacity`` at once
    after an idle spell (GCRA). The rate and capacity change in place (``set``).

    ``catchup_s``: a waiter woken this late (a busy machine) does not lose the slots it
    missed: they are given at once, as the bucket alone would give only ``capacity`` of them.
    That keeps the rate under load; 0 keeps every one-second window within ``rate`` plus
    ``capacity`` (a known ceiling's promise)."""

    def __init__(self, rate: float, capacity: float = 1.0, catchup_s: float = 0.0) -> None:
        self._interval = 1.0 / rate
        self._slack = (max(1.0, capacity) - 1.0) * self._interval
        self._catchup = catchup_s
        self._next = 0.0  # the theoretical time of the next slot
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def rate(self) -> float:
        return 1.0 / self._interval

    @property
    def capacity(self) -> float:
        return 1.0 + self._slack / self._interval

    def set(self, rate: float, capacity: float = 1.0) -> None:
        interval = 1.0 / rate
        # the next slot keeps the new spacing from the last one given
        self._next += interval - self._interval
        self._interval = interval
        self._slack = (max(1.0, capacity) - 1.0) * interval
        if self._waiters:
            self._arm()

    def free(self) -> bool:
        """A slot is free now and nobody waits for it."""
        return not self._waiters and time.monotonic() >= self._next - self._slack

    def _take(self, now: float) -> None:
        self._next = max(self._next, now) + self._interval

    async def acquire(self) -> None:
        now = time.monotonic()
        if not self._waiters and now >= self._next - self._slack:
            self._take(now)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._timer is None:
            self._arm()
        try:
            await future
        except asyncio.CancelledError:
            if future in self._waiters:  # not given its slot: it leaves the queue
                self._waiters.remove(future)
            raise

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = self._next - self._slack - time.monotonic()
        if 0.0 < delay < _TICK_S <= self._catchup:
            # uvloop counts a timer's delay in whole milliseconds: a shorter one fires at once,
            # again and again until the slot is due (a busy loop: ~45 wake-ups a waiter in a
            # run's slow start). Where missed slots are caught up, a waiter woken up to a
            # millisecond late loses none of them: the slots keep their times.
            delay = _TICK_S
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._release)

    def _release(self) -> None:
        self._timer = None
        now = time.monotonic()
        waiters = self._waiters
        while waiters and now >= self._next - self._slack:
            future = waiters.popleft()
            if future.done():  # cancelled while it waited
                continue
            future.set_result(None)
            self._next = max(self._next, now - self._catchup) + self._interval
        if waiters:
            self._arm()


class AdaptiveLimiter:
    """One slot per HTTP attempt, at the controller's rate. Safe for many concurrent tasks."""

    def __init__(self, controller: RateController, *, burst_s: float = 0.015) -> None:
        if burst_s <= 0:
            raise ValueError(f"burst_s must be > 0 seconds, got {burst_s!r}")
        self.controller = controller
        self.burst_s = burst_s
        # a known ceiling: no catching up of slots a late wake-up missed (see Pacer)
        catchup = 0.0 if controller.ceiling is not None else _CATCHUP_S
        self._pacer = Pacer(controller.rate, self._capacity(controller.rate), catchup)
        self._waiting: set[asyncio.Task[object]] = set()

    def _capacity(self, rate: float) -> float:
        """Slots at once after an idle spell: ``burst_s`` of the rate, at least one."""
        capacity = rate * self.burst_s
        ceiling = self.controller.ceiling
        if ceiling is not None:
            capacity = min(capacity, ceiling * CEILING_BURST_SHARE)
        return max(1.0, capacity)

    @property
    def rate(self) -> float:
        return self.controller.rate

    @property
    def shape(self) -> tuple[float, float]:
        """The bucket now: its capacity and its rate."""
        return self._pacer.capacity, self._pacer.rate

    def _retune(self) -> None:
        rate = self.controller.rate
        self._pacer.set(rate, self._capacity(rate))

    async def acquire(self) -> None:
        controller = self.controller
        if self._pacer.free():
            if controller.tick():
                self._retune()
            await self._pacer.acquire()
            return
        controller.on_wait()
        if controller.tick():
            self._retune()
        task = asyncio.current_task()
        if task is None:  # not in a task: nothing to cancel it by
            await self._pacer.acquire()
            return
        waiting = self._waiting
        waiting.add(task)
        try:
            await self._pacer.acquire()
        finally:
            waiting.discard(task)

    def cancel_waiting(self) -> None:
        """Cancel every task waiting for a slot now (a stopping pool: unsent is not sent)."""
        for task in list(self._waiting):
            task.cancel()

    def success(self) -> None:
        self.controller.on_success()

    def throttled(self, sent_at: float | None = None) -> None:
        """A 429 came back; ``sent_at``: when its request was sent (``time.monotonic``)."""
        controller = self.controller
        if controller.on_throttled(sent_at):
            self._retune()
            log.debug("limiter.rate_cut", rate=round(controller.rate, 1),
                      throttled=controller.throttled, cuts=controller.decreases)

    def stated(self, headers: Mapping[str, str]) -> None:
        """An answer carried rate-limit headers: follow the limit they state."""
        said = rate_headers.stated(headers)
        if said is not None and self.controller.on_stated(said):
            self._retune()

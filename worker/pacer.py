"""The bucket the rate limiter drives: slots evenly spaced at a rate that changes in place.

It hands out slots evenly spaced at its rate (GCRA: one theoretical time of the next slot),
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

#: the shortest wait a timer is armed for where missed slots are caught up (see ``_arm``)
_TICK_S = 0.001


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

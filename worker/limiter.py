"""The pool's rate limit: an even-rate aiolimiter whose rate adapts to the API.

Two parts, so the arithmetic is tested without sleeping:

- ``RateController``: pure arithmetic over an injectable clock (AIMD, as TCP does it).

  * With a known ceiling (``--rate``) it starts at the ceiling's share (see below) and never
    goes above it. With none it starts at ``start`` and doubles every ``step_s`` while demand
    exceeds it (slow start), but never past twice the rate the answers come back at, so a
    slow API is not flooded before its first 429 can arrive.
  * The run's first 429 (it ends slow start) cuts the rate to 95% of what the API has just
    been accepting (the busiest recent 100 ms of answers; half the rate if none). A server's
    own burst can hide its limit until then, so 50 ms later one second look cuts again, to
    95% of what it accepted since the first cut, if 429s still come.
  * After that a 429 lowers the rate at most once per congestion epoch: the 429 must answer
    a request sent after the last cut (one sent before says nothing new), and ``epoch_s``
    must have passed. The cut multiplies the rate by ``decrease``. The rate then climbs back
    additively while demand exceeds it: by ``increase_per_s`` of the rate that the episode
    interrupted (or of the limit the first cuts measured), each second, so it is back there
    in ``(1 - decrease) / increase_per_s`` seconds whatever the scale.
  * A 429 counts as a signal only when the last second holds at least ``noise_count`` 429s
    and they are more than ``noise_share`` of its answers: a stray 429 among hundreds of
    accepted requests (a proxy hiccup) does not slow a run; the target's own retry still
    honours its Retry-After. (Retry-After is not applied to the whole limiter: a token
    bucket's 1-second Retry-After would idle every worker for nothing.)

- ``AdaptiveLimiter``: one ``aiolimiter.AsyncLimiter`` with a small bucket (``burst_s`` of the
  rate, at least one request; no start-up burst), re-tuned in place when the controller moves.
  Every HTTP attempt, retries and task polls included, takes one slot.

Why a known ceiling is run at 98% of itself, with a bucket of at most 1% of it: a leaky bucket
admits its capacity on top of its rate in any window (98% + 1%), and jitter on the way bunches
arrivals; the last 1% keeps every one-second window the server sees at or below the ceiling
(at 98.5% with a 15 ms bucket the bench once saw 201 in a second against a ceiling of 200).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiolimiter import AsyncLimiter

from worker.log import get_logger

Clock = Callable[[], float]

log = get_logger("bulk_tagger.limiter")

#: A known ceiling is run at this share of itself (see the module docstring).
CEILING_SHARE = 0.98
#: The bucket under a known ceiling holds at most this share of it (see above).
CEILING_BURST_SHARE = 0.01
_BINS = 10  # the last second, in 100 ms bins
_BIN_S = 1.0 / _BINS
_SLOW_START_WINDOW_S = 0.2
_EPISODE_GAP_S = 1.0  # cuts closer than this belong to one congestion episode
_PROBE_GAP_S = 0.05  # the second look after a run's first cut comes this soon
_PROBE_SHARE = 0.95  # ... and cuts to this share of what the API accepted meanwhile


class RateController:
    """Where the rate should be, from what the API answered. Rates are requests per second,
    times in seconds of ``clock``."""

    def __init__(
        self,
        ceiling: float | None = None,
        *,
        start: float = 20.0,
        floor: float = 1.0,
        maximum: float = 20_000.0,
        step_s: float = 0.05,
        decrease: float = 0.85,
        increase_per_s: float = 0.08,
        epoch_s: float = 0.25,
        noise_share: float = 0.02,
        noise_count: int = 3,
        clock: Clock = time.monotonic,
    ) -> None:
        if ceiling is not None and ceiling <= 0:
            raise ValueError(f"ceiling must be > 0 requests/s, got {ceiling!r}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be between 0 and 1, got {decrease!r}")
        if start <= 0 or floor <= 0 or maximum <= 0:
            raise ValueError("start, floor and maximum must be > 0 requests/s")
        if step_s <= 0 or epoch_s <= 0 or increase_per_s <= 0:
            raise ValueError("step_s, epoch_s and increase_per_s must be > 0")
        self.clock = clock
        self.ceiling = ceiling
        self.maximum = ceiling * CEILING_SHARE if ceiling is not None else maximum
        self.floor = min(floor, self.maximum)
        self.slow_start = ceiling is None
        self.rate = self.maximum if ceiling is not None else max(self.floor, min(start, maximum))
        self.step_s = step_s
        self.decrease = decrease
        self.increase_per_s = increase_per_s
        self.epoch_s = epoch_s
        self.noise_share = noise_share
        self.noise_count = noise_count
        now = clock()
        self._started = now
        self._last_step = now
        self._last_decrease: float | None = None
        self._saturated = False
        # additive increase: requests/s gained per second (set by each cut)
        self._slope = increase_per_s * self.rate
        # answers in the last second, in 100 ms bins: accepted (not 429) and throttled (429)
        self._ok = [0] * _BINS
        self._no = [0] * _BINS
        self._bin_at = int(now / _BIN_S)
        self._top = self.rate  # the rate the current congestion episode interrupted
        self._ok_since_cut = 0
        self._probing = False  # after the run's first cut: one quick second look
        #: 429s seen, and how many of them lowered the rate
        self.throttled = 0
        self.decreases = 0

    # -- the last second's answers ----------------------------------------------------------
    def _roll(self, now: float) -> int:
        slot = int(now / _BIN_S)
        gap = slot - self._bin_at
        if gap > 0:
            ok, no = self._ok, self._no
            for i in range(1, min(gap, _BINS) + 1):
                j = (self._bin_at + i) % _BINS
                ok[j] = no[j] = 0
            self._bin_at = slot
        return slot % _BINS

    def accepted_last_second(self) -> int:
        """Answers other than 429 in the last second."""
        self._roll(self.clock())
        return sum(self._ok)

    def _accepted_rate(self, now: float, span_s: float) -> float:
        """Accepted answers per second over the last ``span_s`` (whole bins, up to a second),
        counting only time since the controller started."""
        current = self._roll(now)
        bins = max(1, min(_BINS, round(span_s / _BIN_S)))
        total = sum(self._ok[(current - i) % _BINS] for i in range(bins))
        # the current bin is only partly over: count the time it has run, not all of it
        covered = (bins - 1) * _BIN_S + (now - self._bin_at * _BIN_S)
        return total / max(_BIN_S, min(covered, now - self._started))

    def _recent_accepted_rate(self, now: float) -> float:
        """The API's acceptance rate just now: the busier of the last whole 100 ms bin and the
        current one (if it has run 50 ms). While the rate ramps up, a longer look would
        average in the slower past."""
        current = self._roll(now)
        best = self._ok[(current - 1) % _BINS] / _BIN_S
        ran = now - self._bin_at * _BIN_S
        if ran >= _BIN_S / 2:
            best = max(best, self._ok[current] / ran)
        return best

    # -- signals ------------------------------------------------------------------------------
    def on_wait(self) -> None:
        """Demand exceeded the rate: an acquisition had to wait."""
        self._saturated = True

    def on_success(self) -> None:
        """The API answered, other than with a 429 (it accepted the request's rate)."""
        self._ok[self._roll(self.clock())] += 1
        self._ok_since_cut += 1

    def on_throttled(self, sent_at: float | None = None) -> bool:
        """A 429 came back to a request sent at ``sent_at`` (the clock's time; None: unknown).

        Returns True when that lowered the rate. One cut per congestion epoch: a 429 to a
        request sent before the last cut says nothing new (it was sent at the old rate), so
        it cuts again only when sent after that cut, or (``sent_at`` unknown) ``epoch_s``
        after it.
        """
        self.throttled += 1
        now = self.clock()
        current = self._roll(now)
        self._no[current] += 1
        last = self._last_decrease
        if self._probing and last is not None and now - last > _EPISODE_GAP_S:
            self._probing = False  # the first cut was enough
        gap = _PROBE_GAP_S if self._probing else self.epoch_s
        if last is not None and (now - last < gap or (sent_at is not None and sent_at < last)):
            return False
        throttled = sum(self._no)
        if throttled < self.noise_count or throttled <= self.noise_share * (
            throttled + sum(self._ok)
        ):
            return False  # a stray 429, not a limit
        rate = self.rate
        if last is None or now - last > _EPISODE_GAP_S:
            self._top = rate  # a new congestion episode: the rate it interrupted
        if last is None:
            # the run's first cut (it ends slow start): down to what the API has just been
            # accepting, then a second look soon: its own burst may have hidden the limit
            accepted = min(rate, self._recent_accepted_rate(now))
            target = _PROBE_SHARE * accepted if accepted else rate / 2
            self._top = max(target, accepted)
            self.slow_start = False
            self._probing = True
        elif self._probing:
            # still refused after that first cut: the API is past any burst and has been
            # accepting its limit since, which is the truth to cut to (and to climb from)
            accepted = self._ok_since_cut / max(now - last, _PROBE_GAP_S)
            target = min(rate * self.decrease, _PROBE_SHARE * accepted)
            self._top = max(target, accepted)
            self._probing = False
        else:
            target = rate * self.decrease
        self.rate = max(self.floor, min(self.maximum, target))
        # climb back to where the episode began in (1 - decrease) / increase_per_s seconds
        self._slope = self.increase_per_s * max(self._top, self.rate)
        self._last_decrease = now
        self._last_step = now
        self._ok_since_cut = 0
        self.decreases += 1
        return True

    def tick(self) -> bool:
        """Move the rate up if demand kept exceeding it; True when it changed."""
        now = self.clock()
        elapsed = now - self._last_step
        if elapsed < self.step_s:
            return False
        self._last_step = now
        saturated, self._saturated = self._saturated, False
        if not saturated or self.rate >= self.maximum:
            return False
        # an idle spell earns nothing: credit at most a few steps of climbing
        elapsed = min(elapsed, 4 * self.step_s)
        if self.slow_start:
            # double, but no faster than the answers come back: twice the rate the API has
            # been answering at, so a slow API (long round trips) is not flooded before its
            # first 429 can arrive (TCP's slow start grows by acknowledgements the same way)
            answered = self._accepted_rate(now, _SLOW_START_WINDOW_S)
            grown = min(self.rate * 2, self.maximum, 2 * answered)
            if grown <= self.rate:
                return False
            self.rate = grown
        else:
            self.rate = min(self.maximum, self.rate + self._slope * elapsed)
        return True


class AdaptiveLimiter:
    """One slot per HTTP attempt, at the controller's rate. Safe for many concurrent tasks."""

    def __init__(self, controller: RateController, *, burst_s: float = 0.015) -> None:
        if burst_s <= 0:
            raise ValueError(f"burst_s must be > 0 seconds, got {burst_s!r}")
        self.controller = controller
        self.burst_s = burst_s
        self._limiter = AsyncLimiter(*self._shape(controller.rate))
        self._waiting: set[asyncio.Task[Any]] = set()

    def _shape(self, rate: float) -> tuple[float, float]:
        # capacity of at least one request, time period so that capacity/period == rate
        capacity = rate * self.burst_s
        ceiling = self.controller.ceiling
        if ceiling is not None:
            capacity = min(capacity, ceiling * CEILING_BURST_SHARE)
        capacity = max(1.0, capacity)
        return capacity, capacity / rate

    @property
    def rate(self) -> float:
        return self.controller.rate

    @property
    def shape(self) -> tuple[float, float]:
        """The aiolimiter's (max_rate, time_period) now: capacity and its period."""
        return self._limiter.max_rate, self._limiter.time_period

    def _retune(self) -> None:
        # aiolimiter has no public setter: settle the level at the old rate, then change the
        # three numbers it derives everything from, and let a waiter re-check its wake-up time
        lim = self._limiter
        capacity, period = self._shape(self.controller.rate)
        lim._leak()
        lim.max_rate = capacity
        lim.time_period = period
        lim._rate_per_sec = capacity / period
        lim._level = min(lim._level, capacity)
        lim._wake_next()

    async def acquire(self) -> None:
        controller = self.controller
        lim = self._limiter
        if lim.has_capacity():
            if controller.tick():
                self._retune()
            await lim.acquire()
            return
        controller.on_wait()
        if controller.tick():
            self._retune()
        task = asyncio.current_task()
        waiting = self._waiting
        if task is not None:
            waiting.add(task)
        try:
            await lim.acquire()
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

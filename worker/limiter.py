"""The pool's rate limit: an even-rate aiolimiter whose rate adapts to the API.

Two parts, so the arithmetic is tested without sleeping:

- ``RateController``: pure arithmetic over an injectable clock. With a known ceiling
  (``--rate``) it starts just under it and never goes above; a 429 still lowers it. With no
  ceiling it starts modest and doubles every ``step_s`` while demand exceeds it (slow start);
  the first 429 ends slow start, cutting the rate to what the API accepted in the last second
  (at most half the rate). After that, each 429 epoch multiplies the rate by ``decrease`` and
  the rate climbs back additively (``increase_per_s`` of itself each second) while saturated.
- ``AdaptiveLimiter``: one ``aiolimiter.AsyncLimiter`` with a small bucket (``burst_s`` of the
  rate: 5 ms, no start-up burst), re-tuned in place when the controller moves. Every HTTP
  attempt, retries and task polls included, takes one slot.

Why the ceiling is scaled down by 1.5%: a leaky bucket admits its capacity on top of its rate
in any window, and loopback jitter bunches arrivals; 98.5% keeps every one-second window the
server sees at or below the ceiling while staying above the 98% we promise.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

Clock = Callable[[], float]

#: A known ceiling is run at this share of itself (see the module docstring).
CEILING_SHARE = 0.985


class RateController:
    """Where the rate should be, from what the API answered. Rates are requests per second."""

    def __init__(
        self,
        ceiling: float | None = None,
        *,
        start: float = 20.0,
        floor: float = 1.0,
        maximum: float = 20_000.0,
        step_s: float = 0.05,
        decrease: float = 0.85,
        increase_per_s: float = 0.03,
        epoch_s: float = 0.5,
        clock: Clock = time.monotonic,
    ) -> None:
        if ceiling is not None and ceiling <= 0:
            raise ValueError(f"ceiling must be > 0 requests/s, got {ceiling!r}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be between 0 and 1, got {decrease!r}")
        self.clock = clock
        self.ceiling = ceiling
        self.maximum = ceiling * CEILING_SHARE if ceiling is not None else maximum
        self.floor = min(floor, self.maximum)
        self.slow_start = ceiling is None
        self.rate = self.maximum if ceiling is not None else min(start, self.maximum)
        self.step_s = step_s
        self.decrease = decrease
        self.increase_per_s = increase_per_s
        self.epoch_s = epoch_s
        now = clock()
        self._last_step = now
        self._last_decrease = -1e9
        self._saturated = False
        # successes in the last second, in ten 100 ms bins (for the slow-start exit)
        self._bins = [0] * 10
        self._bin_at = int(now * 10)
        self.throttled = 0

    def _roll(self, now: float) -> None:
        slot = int(now * 10)
        gap = slot - self._bin_at
        if gap > 0:
            for i in range(1, min(gap, 10) + 1):
                self._bins[(self._bin_at + i) % 10] = 0
            self._bin_at = slot

    def accepted_last_second(self) -> int:
        self._roll(self.clock())
        return sum(self._bins)

    def on_wait(self) -> None:
        """Demand exceeded the rate: an acquisition had to wait."""
        self._saturated = True

    def on_success(self) -> None:
        now = self.clock()
        self._roll(now)
        self._bins[self._bin_at % 10] += 1

    def on_throttled(self) -> bool:
        """A 429 came back. Returns True when the rate was lowered (once per epoch)."""
        self.throttled += 1
        now = self.clock()
        if now - self._last_decrease < self.epoch_s:
            return False
        self._last_decrease = now
        if self.slow_start:
            self.slow_start = False
            accepted = self.accepted_last_second()
            target = min(self.rate / 2, accepted * 0.9) if accepted else self.rate / 2
        else:
            target = self.rate * self.decrease
        self.rate = max(self.floor, target)
        self._last_step = now
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
        if self.slow_start:
            self.rate = min(self.maximum, self.rate * 2)
        else:
            self.rate = min(self.maximum, self.rate * (1 + self.increase_per_s * elapsed))
        return True


class AdaptiveLimiter:
    """One slot per HTTP attempt, at the controller's rate. Safe for many concurrent tasks."""

    def __init__(self, controller: RateController, *, burst_s: float = 0.005) -> None:
        self.controller = controller
        self.burst_s = burst_s
        self._limiter = AsyncLimiter(*self._shape(controller.rate))

    def _shape(self, rate: float) -> tuple[float, float]:
        # capacity of at least one request, time period so that capacity/period == rate
        capacity = max(1.0, rate * self.burst_s)
        return capacity, capacity / rate

    @property
    def rate(self) -> float:
        return self.controller.rate

    def _retune(self) -> None:
        lim = self._limiter
        capacity, period = self._shape(self.controller.rate)
        lim._leak()  # settle the level at the old rate before changing it
        lim.max_rate = capacity
        lim.time_period = period
        lim._rate_per_sec = capacity / period
        lim._level = min(lim._level, capacity)
        lim._wake_next()

    async def acquire(self) -> None:
        controller = self.controller
        lim = self._limiter
        if not lim.has_capacity():
            controller.on_wait()
        if controller.tick():
            self._retune()
        await lim.acquire()

    def success(self) -> None:
        self.controller.on_success()

    def throttled(self) -> None:
        if self.controller.on_throttled():
            self._retune()


class NoLimiter:
    """For tools that must not be limited (the simulator's own tests)."""

    rate = float("inf")

    async def acquire(self) -> None:
        return None

    def success(self) -> None:
        return None

    def throttled(self) -> None:
        return None

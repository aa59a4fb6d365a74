"""The simulator's rate limits: a token bucket whose rate may follow a schedule, a quota per
fixed window, and the headers that state them.

- ``Faults.rate_limit`` (with ``rate_burst``, default one second of it): a token bucket that
  starts full. ``Faults.rate_schedule``: ``((from_s, limit), ...)`` changes the bucket's rate
  over time, seconds counted from the first ``/cloud/`` request (before the first entry:
  ``rate_limit``, or none); the burst follows the rate unless ``rate_burst`` is set, and a
  drop keeps no more tokens than the new burst. A limit of 0 refuses everything (a storm),
  with a Retry-After of the time to the storm's end; the bucket fills meanwhile.
- ``Faults.quota`` requests per ``quota_window_s``, in fixed windows from the first request.
- ``Faults.rate_headers``: ``none``; ``ietf``: ``RateLimit-Policy: "default";q=Q;w=W`` and
  ``RateLimit: "default";r=R;t=T`` (the IETF draft); ``x``: ``X-RateLimit-Limit: Q``,
  ``X-RateLimit-Remaining: R``, ``X-RateLimit-Reset: T``. They state the quota when there is
  one, else the bucket (its rate per 1-second window); every ``/cloud/`` answer that passed
  the limits carries them, and so does a 429 of theirs.
"""

from __future__ import annotations

import math

from worker.simulator.config import Faults


class Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst``; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else the seconds until the next one."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def retune(self, rate: float, burst: float, now: float) -> None:
        self.refill(now)
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, burst)


class Limits:
    """The limits of ``faults``; ``take(now)`` for each ``/cloud/`` request."""

    def __init__(self, faults: Faults, now: float) -> None:
        self.faults = faults
        self._t0: float | None = None
        self._bucket: Bucket | None = None
        self._limit = faults.rate_limit  # the bucket's rate now (None: no bucket)
        if self._limit:
            self._bucket = Bucket(self._limit, self._burst(self._limit), now)
        self._window_at = 0.0
        self._used = 0

    def _burst(self, rate: float) -> float:
        burst = self.faults.rate_burst
        return max(1.0, burst if burst is not None else rate)

    def _scheduled(self, now: float) -> float | None:
        """The scheduled limit at ``now`` (None: the schedule has not begun)."""
        assert self._t0 is not None
        t = now - self._t0
        limit = None
        for at, value in self.faults.rate_schedule:
            if t >= at:
                limit = value
        return limit

    def _storm_end(self, now: float) -> float:
        assert self._t0 is not None
        t = now - self._t0
        later = [at for at, value in self.faults.rate_schedule if at > t and value > 0]
        return min(later) - t if later else 1.0

    def take(self, now: float) -> tuple[float, dict[str, str]]:
        """(0.0, headers) if the request may pass, else (seconds to wait, headers) for a 429."""
        f = self.faults
        if self._t0 is None:
            self._t0 = now
            self._window_at = now
        wait = 0.0
        if f.rate_schedule:
            limit = self._scheduled(now)
            if limit is not None and limit != self._limit:
                self._limit = limit
                if limit > 0:
                    if self._bucket is None:
                        self._bucket = Bucket(limit, self._burst(limit), now)
                    else:
                        self._bucket.retune(limit, self._burst(limit), now)
            if limit == 0:
                wait = self._storm_end(now)
        if f.quota is not None:
            if now - self._window_at >= f.quota_window_s:
                skipped = math.floor((now - self._window_at) / f.quota_window_s)
                self._window_at += skipped * f.quota_window_s
                self._used = 0
            if not wait and self._used >= f.quota:
                wait = self._window_at + f.quota_window_s - now
        if not wait and self._bucket is not None and self._limit:
            wait = self._bucket.take(now)
        if not wait and f.quota is not None:
            self._used += 1
        return wait, self._headers(now)

    def _headers(self, now: float) -> dict[str, str]:
        f = self.faults
        style = f.rate_headers
        if style == "none":
            return {}
        if f.quota is not None:
            quota, window = f.quota, f.quota_window_s
            remaining = max(0, f.quota - self._used)
            reset = self._window_at + f.quota_window_s - now
        elif self._bucket is not None and self._limit:
            bucket = self._bucket
            quota, window = int(self._limit), 1.0
            remaining = max(0, math.floor(bucket.tokens))
            reset = (bucket.burst - bucket.tokens) / bucket.rate
        else:
            return {}
        reset_s = max(0, math.ceil(reset))
        if style == "ietf":
            return {
                "RateLimit-Policy": f'"default";q={quota};w={window:g}',
                "RateLimit": f'"default";r={remaining};t={reset_s}',
            }
        return {
            "X-RateLimit-Limit": str(quota),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset_s),
        }

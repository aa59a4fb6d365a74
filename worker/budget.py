"""Run-level budgets: a retry budget and a circuit breaker. Pure arithmetic, no I/O.

Per-request retries (``worker.retry``) bound how long one call keeps trying. These two bound
what the whole run does to the API when many calls fail at once:

- ``RetryBudget`` (Finagle's and the SRE book's retry budget): retries may add at most
  ``ratio`` (10%) to the requests of the last ``window_s`` (10 s), plus a small reserve of
  ``min_per_s`` (10) retries a second, so a handful of retries is always allowed. A failing
  API then sees about ``1 + ratio`` times the run's first attempts, not ``max_attempts``
  times. First attempts deposit (``on_request``), retries withdraw (``on_retry``);
  ``can_retry`` says whether one more retry fits, ``retry_delay`` how long until it may.
  The budget guards an API that is failing, not one that failed: each answer is told
  (``on_answer``), and once ``healthy_after`` (5) answers in a row were good, retries the
  window had no room for go ahead (a short storm overdraws the window for its whole 10 s;
  the retries it left waiting would otherwise hold the run for that long). While the window
  refuses and nothing says the API is well, one retry goes every ``1 / min_per_s`` seconds
  (a probe), so a run whose every worker waits still learns when the API is back.
- ``CircuitBreaker``: watches how targets end and trips when they keep failing alike: the last
  ``consecutive`` (50) counted outcomes all failed for the same reason, or, over the last
  ``window_s`` (60 s), at least ``min_failures`` (100) failed and they are at least
  ``failure_ratio`` (90%) of the counted outcomes. Its ``Trip`` says which exit code the
  run ends with: 75 when the reason is transient (``unreachable``, ``rate_limited``: the API is
  down or overloaded, ``--resume`` later), 1 otherwise (every PATCH rejected the same way:
  the job or the key is wrong, running on would only repeat it).

Both take an injectable ``clock`` (monotonic seconds) so tests drive them without sleeping.
Neither is safe across threads; the pool runs on one event loop.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker import defaults
from worker.errors import ExitCode

Clock = Callable[[], float]

#: Failure reasons that mean "the API is not answering": the run stops with 75 (resume later).
TRANSIENT_REASONS: frozenset[str] = frozenset({"unreachable", "rate_limited"})
#: Failure reasons about one image, not the run: a stale id or a lock says nothing about the
#: next target, so they neither trip the breaker nor break a streak.
IGNORED_REASONS: frozenset[str] = frozenset({"not_found", "lock_timeout"})
#: Statuses that count as a target going well.
OK_STATUSES: frozenset[str] = frozenset({"updated", "unchanged", "skipped"})


def _positive(name: str, value: float, hint: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r} (HINT: {hint})")


class _Window:
    """Counts over a sliding window: ``bins`` slots of ``window_s / bins`` seconds; a slot
    leaves the window whole, so the window is exact to one slot. A slot holds ``width`` counts
    and a Counter of keys; ``totals`` are the counts over the window."""

    def __init__(self, window_s: float, bins: int, width: int, clock: Clock) -> None:
        self.slot_s = window_s / bins
        self.bins = bins
        self.clock = clock
        self.totals = [0] * width
        #: (slot number, counts, keys), oldest first
        self.slots: deque[tuple[int, list[int], Counter[tuple[str, int | None]]]] = deque()

    def current(self) -> tuple[list[int], Counter[tuple[str, int | None]]]:
        """The counts and keys of the slot of now (slots that left the window are dropped)."""
        now_slot = int(self.clock() // self.slot_s)
        slots, totals = self.slots, self.totals
        edge = now_slot - self.bins
        while slots and slots[0][0] <= edge:
            _, counts, _keys = slots.popleft()
            for i, n in enumerate(counts):
                totals[i] -= n
        if not slots or slots[-1][0] != now_slot:
            slots.append((now_slot, [0] * len(totals), Counter()))
        _, counts, keys = slots[-1]
        return counts, keys

    def add(self, index: int) -> Counter[tuple[str, int | None]]:
        """Count one in ``index`` now; the slot's keys, for the caller to count a key in."""
        counts, keys = self.current()
        counts[index] += 1
        self.totals[index] += 1
        return keys


class RetryBudget:
    """Retries allowed over a sliding window: ``ratio`` of the requests plus a reserve.

    The window is ``bins`` slots of ``window_s / bins`` seconds; a slot leaves the window
    whole, so the window is exact to one slot. Allowed retries at any moment:
    ``ratio * requests_in_window + min_per_s * window_s - retries_in_window``.
    """

    def __init__(
        self,
        *,
        ratio: float = defaults.RETRY_BUDGET_PERCENT / 100,
        window_s: float = 10.0,
        min_per_s: float = 10.0,
        bins: int = 10,
        healthy_after: int = 5,
        clock: Clock = time.monotonic,
    ) -> None:
        if not ratio >= 0:  # also refuses NaN
            raise ValueError(f"ratio must be >= 0, got {ratio!r} (HINT: 0.1 allows 10% retries)")
        _positive("window_s", window_s, "the sliding window in seconds, e.g. 10")
        if not min_per_s >= 0:
            raise ValueError(
                f"min_per_s must be >= 0, got {min_per_s!r} "
                "(HINT: retries a second always allowed, e.g. 10)"
            )
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins!r}")
        if healthy_after < 1:
            raise ValueError(f"healthy_after must be >= 1, got {healthy_after!r}")
        self.ratio = ratio
        self.healthy_after = healthy_after
        #: good answers in a row (any request's), and when the last retry went
        self._good = 0
        self._last_retry = -math.inf
        self.window_s = window_s
        self.min_per_s = min_per_s
        self.reserve = min_per_s * window_s
        self.clock = clock
        #: counts 0: first attempts, 1: retries
        self._window = _Window(window_s, bins, 2, clock)
        #: totals over the budget's life: first attempts, retries taken, retries refused
        self.requests_total = 0
        self.retries_total = 0
        self.refused_total = 0

    @property
    def allowance(self) -> float:
        """How many more retries fit in the window now (may be negative after a burst)."""
        self._window.current()
        requests, retries = self._window.totals
        return self.ratio * requests + self.reserve - retries

    def on_request(self) -> None:
        """A first attempt was sent (retries are not deposits: they would fund themselves)."""
        self._window.add(0)
        self.requests_total += 1

    def can_retry(self) -> bool:
        """Whether one more retry fits in the budget now."""
        return self.allowance >= 1.0

    def on_answer(self, good: bool) -> None:
        """An attempt was answered: ``good`` unless the answer asks for a retry (a 5xx, a
        429, no answer at all); a 404 or a 422 is a good answer from a working API."""
        self._good = self._good + 1 if good else 0

    @property
    def healthy(self) -> bool:
        """The last ``healthy_after`` answers were all good: nothing to guard."""
        return self._good >= self.healthy_after

    def on_retry(self) -> None:
        """A retry was sent (whether or not ``can_retry`` said yes)."""
        self._window.add(1)
        self.retries_total += 1
        self._last_retry = self.clock()

    def try_retry(self) -> bool:
        """Take one retry if it fits, the API answers well again, or a probe is due (True);
        else count a refusal (False)."""
        if self.can_retry() or self.healthy or self._probe_in() == 0.0:
            self.on_retry()
            return True
        self.refused_total += 1
        return False

    def _probe_in(self) -> float:
        """Seconds until a probe may go: ``1 / min_per_s`` after the last retry (0.0: now;
        never without a reserve)."""
        if self.min_per_s <= 0:
            return math.inf
        return max(0.0, self._last_retry + 1.0 / self.min_per_s - self.clock())

    def retry_delay(self) -> float:
        """Seconds until a retry may go: as old slots leave the window, or the next probe
        (0.0 if one may go now). An estimate: requests and good answers meanwhile only bring
        it closer."""
        if self.can_retry() or self.healthy:
            return 0.0
        return min(self.window_delay(), self._probe_in())

    def window_delay(self) -> float:
        """Seconds until the window alone has room for a retry, as old slots leave it."""
        if self.can_retry():
            return 0.0
        now = self.clock()
        window = self._window
        requests, retries = window.totals
        for slot, (slot_requests, slot_retries), _keys in window.slots:
            requests -= slot_requests
            retries -= slot_retries
            if self.ratio * requests + self.reserve - retries >= 1.0:
                return max(0.0, (slot + window.bins) * window.slot_s - now)
        return self.window_s


@dataclass(frozen=True, slots=True)
class Trip:
    """Why the breaker opened: the failure that repeated, how often, and the exit code."""

    reason: str
    http_status: int | None
    failures: int
    exit_code: ExitCode
    message: str


def _key(reason: str, http_status: int | None) -> tuple[str, int | None]:
    # "the same reason": a transient failure is one thing whatever the 5xx; a rejection is
    # the same only with the same status (403 and 422 are different mistakes)
    return (reason, None) if reason in TRANSIENT_REASONS else (reason, http_status)


def _describe(reason: str, http_status: int | None) -> str:
    return f"{reason} (HTTP {http_status})" if http_status is not None else reason


class CircuitBreaker:
    """Trips when finished targets keep failing alike; then stays open (``tripped``).

    Counted outcomes: successes (``OK_STATUSES``) and failures whose reason is not in
    ``ignore``. Either rule trips it:

    - streak: the last ``consecutive`` counted outcomes all failed with the same reason
      (same reason and HTTP status, any status for a transient reason);
    - ratio: over the last ``window_s`` seconds (``bins`` slots, exact to one slot), at
      least ``min_failures`` counted outcomes failed and they make at least
      ``failure_ratio`` of the counted outcomes.

    The exit code is 75 when the repeated (streak) or most common (ratio) failure is in
    ``transient``, else 1.
    """

    def __init__(
        self,
        *,
        consecutive: int = defaults.STOP_AFTER_FAILURES,
        window_s: float = 60.0,
        failure_ratio: float = 0.9,
        min_failures: int = 100,
        ignore: Iterable[str] = IGNORED_REASONS,
        transient: Iterable[str] = TRANSIENT_REASONS,
        bins: int = 60,
        clock: Clock = time.monotonic,
    ) -> None:
        if consecutive < 1:
            raise ValueError(
                f"consecutive must be >= 1, got {consecutive!r} "
                "(HINT: how many failures in a row, all alike, stop the run; e.g. 50)"
            )
        _positive("window_s", window_s, "the window of the ratio rule in seconds, e.g. 60")
        if not 0 < failure_ratio <= 1:
            raise ValueError(
                f"failure_ratio must be in (0, 1], got {failure_ratio!r} (HINT: e.g. 0.9)"
            )
        if min_failures < 1:
            raise ValueError(
                f"min_failures must be >= 1, got {min_failures!r} "
                "(HINT: the ratio rule needs this many failures in the window; e.g. 100)"
            )
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins!r}")
        self.consecutive = consecutive
        self.window_s = window_s
        self.failure_ratio = failure_ratio
        self.min_failures = min_failures
        self.ignore = frozenset(ignore)
        self.transient = frozenset(transient)
        self.clock = clock
        self.tripped: Trip | None = None
        self._streak_key: tuple[str, int | None] | None = None
        self._streak = 0
        #: the ratio rule's window; counts 0: counted outcomes, 1: failures (keys: by failure)
        self._window = _Window(window_s, bins, 2, clock)

    def _exit_code(self, reason: str) -> ExitCode:
        return ExitCode.INTERRUPTED if reason in self.transient else ExitCode.FAILED

    def record(
        self, status: str, reason: str | None, http_status: int | None = None
    ) -> Trip | None:
        """Count one finished target; the ``Trip`` once the breaker is open, else None."""
        if self.tripped is not None:
            return self.tripped
        if status in OK_STATUSES:
            key = None
        elif status == "failed" and (reason or "failed") not in self.ignore:
            key = _key(reason or "failed", http_status)
        else:
            return None  # an ignored reason, or a status that is no ending (planned)
        if key is None:
            self._streak_key, self._streak = None, 0
        elif key == self._streak_key:
            self._streak += 1
        else:
            self._streak_key, self._streak = key, 1
        keys = self._window.add(0)
        if key is not None:
            self._window.add(1)
            keys[key] += 1
        counted, failures = self._window.totals
        if key is not None and self._streak >= self.consecutive:
            self.tripped = Trip(
                reason=key[0], http_status=key[1], failures=self._streak,
                exit_code=self._exit_code(key[0]),
                message=f"the last {self._streak} targets all failed: "
                f"{_describe(*key)}; stopped instead of grinding on",
            )
        elif failures >= self.min_failures and failures >= self.failure_ratio * counted:
            common: Counter[tuple[str, int | None]] = Counter()
            for _, _, slot_keys in self._window.slots:
                common.update(slot_keys)
            ((top, top_n),) = common.most_common(1)
            self.tripped = Trip(
                reason=top[0], http_status=top[1], failures=failures,
                exit_code=self._exit_code(top[0]),
                message=f"{failures} of the last {counted} targets "
                f"({failures / counted:.0%}) failed within {self.window_s:g} s, "
                f"most often {_describe(*top)} ({top_n}); stopped instead of grinding on",
            )
        return self.tripped

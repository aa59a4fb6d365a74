"""Retry: the one place that says what is retried, how long, and how Retry-After is honoured.

    retried:      Transient (408, 5xx, connection lost, timeouts), RateLimited (429)
    not retried:  NotFound, Rejected, Locked (the pool parks it), AuthFailed (the run stops),
                  asyncio.CancelledError (never: a signal must stop the run)

The first attempt is made directly; only a failed one builds a tenacity ``AsyncRetrying``
(per call: a shared one mixes state across tasks), because tenacity on the happy path costs
two thirds of the client stack's overhead (README, "Retries"). Waits are exponential with full
jitter, ``base_s`` doubling up to ``max_wait_s``; a 429's Retry-After is a floor under the
wait. ``stop_before_delay`` bounds the whole by ``budget_s`` without overrunning it.

A policy may carry the run's retry budget (``run_budget``, see ``worker.budget``): first
attempts deposit, retries withdraw, and a retry the budget cannot fund in time is not made.

Waits go through ``sleep`` (``asyncio.sleep`` unless the caller passes its own, e.g. one the
pool can cut short on SIGTERM). Cancelling the calling task during a wait or an attempt raises
``asyncio.CancelledError`` out of ``call`` at once: it is never retried nor turned into an
outcome.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
)

from worker import defaults
from worker.errors import ApiError, RateLimited

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]


class RunBudget(Protocol):
    """The run-wide retry budget a policy may carry (``worker.budget.RetryBudget``)."""

    def on_request(self) -> None: ...
    def on_answer(self, good: bool) -> None: ...
    def try_retry(self) -> bool: ...
    def retry_delay(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds of one call's retries. Seconds; ``max_attempts`` counts the first one too.

    ``run_budget``: one budget shared by every call of a run. Each first attempt deposits,
    each retry withdraws; when it is spent a retry waits for it, never past ``budget_s`` (the
    call then gives up with its last error). None: only this call's own bounds apply.
    """

    budget_s: float = defaults.RETRY_BUDGET_S
    base_s: float = defaults.RETRY_BASE_S
    max_wait_s: float = defaults.RETRY_MAX_WAIT_S
    max_attempts: int = 1000
    run_budget: RunBudget | None = None

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.base_s <= 0 or self.max_wait_s <= 0:
            raise ValueError("retry budget, base and max wait must be > 0 seconds")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def wait(self, exc: BaseException | None, retry_number: int) -> float:
        """Full jitter over an exponential cap; Retry-After (if any) is the floor."""
        cap = min(self.max_wait_s, self.base_s * (2 ** max(0, retry_number - 1)))
        delay = random.uniform(0, cap)
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.budget_s))
        return delay


class _BudgetSpent(Exception):
    """The run's retry budget had no retry for this call in time (never retried itself)."""


class RetryLog:
    """An ``on_retry`` that says at info what is retried and why, at most once every
    ``interval_s``: ``api.retrying`` with the retries since the last line, the latest error
    (its kind, HTTP status and message) and its wait. The first retry is said at once."""

    def __init__(
        self, logger: Any, *, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._since = 0
        self._last: float | None = None

    def __call__(self, exc: BaseException, delay: float) -> None:
        self._since += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        self._log.info(
            "api.retrying", retries=self._since, error=type(exc).__name__,
            status=getattr(exc, "status", None), message=getattr(exc, "message", str(exc)),
            wait_s=round(delay, 2),
        )
        self._since = 0


class Reader:
    """One read at a time (a list page, the projects list, one image) with ``policy``'s
    retries: ``await reader(fn)`` is ``fn()``'s result alone (the client counts the requests;
    nobody counts a read's attempts)."""

    __slots__ = ("on_retry", "policy")

    def __init__(
        self, policy: RetryPolicy, on_retry: Callable[[BaseException, float], None] | None = None
    ) -> None:
        self.policy = policy
        self.on_retry = on_retry

    async def __call__(self, fn: Callable[[], Awaitable[T]]) -> T:
        result, _ = await call(fn, self.policy, on_retry=self.on_retry)
        return result


def is_retryable(exc: BaseException) -> bool:
    """The table's verdict: True for Transient and RateLimited, False for all else (and
    always False for ``asyncio.CancelledError``, which is not an ``ApiError``)."""
    return isinstance(exc, ApiError) and exc.retryable


async def call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[BaseException, float], None] | None = None,
    sleep: Sleep = asyncio.sleep,
) -> tuple[T, int]:
    """``fn()`` with retries; returns (result, attempts). The last error is let through.

    ``on_retry(error, delay_s)`` is called before each wait.
    """
    started = time.monotonic()
    run_budget = policy.run_budget
    if run_budget is not None:
        run_budget.on_request()
    try:
        result = await fn()
    except ApiError as exc:
        if run_budget is not None:
            run_budget.on_answer(not exc.retryable)
        if not exc.retryable or policy.max_attempts <= 1:
            raise
        first: BaseException = exc
    else:
        if run_budget is not None:
            run_budget.on_answer(True)
        return result, 1
    delay = policy.wait(first, 1)
    if delay >= policy.budget_s:
        raise first
    if on_retry is not None:
        on_retry(first, delay)
    await sleep(delay)
    remaining = policy.budget_s - (time.monotonic() - started)
    if remaining <= 0:
        raise first

    def _wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return policy.wait(exc, state.attempt_number + 1)

    def _before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.upcoming_sleep)

    async def admitted() -> bool:
        """One retry from the run's budget, waiting for it (never past this call's budget)."""
        assert run_budget is not None
        while not run_budget.try_retry():
            wait = max(run_budget.retry_delay(), 0.01)
            if time.monotonic() - started + wait >= policy.budget_s:
                return False
            await sleep(wait)
        return True

    attempts = 1
    last = first
    retrying = AsyncRetrying(
        stop=stop_any(stop_before_delay(remaining), stop_after_attempt(policy.max_attempts - 1)),
        wait=_wait,
        retry=retry_if_exception(is_retryable),
        before_sleep=_before_sleep,
        sleep=sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                if run_budget is not None and not await admitted():
                    raise _BudgetSpent
                attempts += 1
                try:
                    result = await fn()
                except ApiError as exc:
                    last = exc
                    if run_budget is not None:
                        run_budget.on_answer(not exc.retryable)
                    raise
                if run_budget is not None:
                    run_budget.on_answer(True)
    except _BudgetSpent:
        raise last from None
    return result, attempts


"""The one retry table: what is retried, how long, how Retry-After is honoured, and that a
cancellation is never retried nor delayed. Waits go through an injected ``sleep`` where the
test is about arithmetic, and through the real one where it is about time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from worker import retry
from worker.budget import RetryBudget
from worker.errors import (
    ApiError,
    AuthFailed,
    Locked,
    NotFound,
    RateLimited,
    Rejected,
    Transient,
)
from worker.retry import RetryPolicy


class Flaky:
    """Raises the given errors in turn, then returns ``done``; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class Sleeps:
    """An injected sleep that records each wait and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


FAST = RetryPolicy(budget_s=30.0, base_s=0.01, max_wait_s=0.05)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (Transient("502", status=502), True),
        (Transient("reset"), True),
        (RateLimited("429", retry_after=0.0), True),
        (NotFound("gone", status=404), False),
        (Rejected("bad", status=400), False),
        (Rejected("forbidden", status=403), False),
        (Locked("locked", task_id="t"), False),
        (AuthFailed("no", status=401), False),
    ],
)
async def test_the_table(error: ApiError, retried: bool) -> None:
    fn = Flaky(error)
    sleeps = Sleeps()
    if retried:
        assert await retry.call(fn, FAST, sleep=sleeps) == ("done", 2)
        assert len(sleeps.delays) == 1
    else:
        with pytest.raises(type(error)) as exc:
            await retry.call(fn, FAST, sleep=sleeps)
        assert exc.value is error and fn.calls == 1 and sleeps.delays == []
    assert retry.is_retryable(error) == retried


def test_cancellation_and_plain_errors_are_never_retryable() -> None:
    assert not retry.is_retryable(asyncio.CancelledError())
    assert not retry.is_retryable(KeyboardInterrupt())
    assert not retry.is_retryable(ValueError("a bug"))


async def test_the_first_attempt_that_succeeds_costs_nothing_more() -> None:
    fn = Flaky()
    sleeps = Sleeps()
    seen: list[tuple[BaseException, float]] = []
    assert await retry.call(fn, FAST, sleep=sleeps, on_retry=lambda e, d: seen.append((e, d))) \
        == ("done", 1)
    assert fn.calls == 1 and sleeps.delays == [] and seen == []


async def test_retries_until_success_with_capped_full_jitter() -> None:
    policy = RetryPolicy(budget_s=60.0, base_s=0.1, max_wait_s=0.4)
    fn = Flaky(*(Transient("503", status=503) for _ in range(6)))
    sleeps = Sleeps()
    seen: list[float] = []
    result = await retry.call(fn, policy, sleep=sleeps, on_retry=lambda e, d: seen.append(d))
    assert result == ("done", 7)
    assert sleeps.delays == seen and len(seen) == 6
    caps = [0.1, 0.2, 0.4, 0.4, 0.4, 0.4]  # base doubling, then max_wait
    assert all(0 <= d <= cap for d, cap in zip(seen, caps, strict=True))


def test_wait_arithmetic() -> None:
    policy = RetryPolicy(budget_s=5.0, base_s=0.5, max_wait_s=4.0)
    for n, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        waits = [policy.wait(Transient("x"), n) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8  # full jitter spans the whole range
    # Retry-After is a floor, even above max_wait; the budget caps it
    assert policy.wait(RateLimited("x", retry_after=3.0), 1) == 3.0
    assert policy.wait(RateLimited("x", retry_after=60.0), 1) == 5.0
    assert 0 <= policy.wait(RateLimited("x", retry_after=None), 1) <= 0.5


async def test_retry_after_is_honoured_on_every_retry() -> None:
    fn = Flaky(RateLimited("429", retry_after=1.5), RateLimited("429", retry_after=2.5))
    sleeps = Sleeps()
    assert await retry.call(fn, FAST, sleep=sleeps) == ("done", 3)
    assert sleeps.delays == [1.5, 2.5]


async def test_a_retry_after_beyond_the_budget_gives_up_at_once() -> None:
    fn = Flaky(RateLimited("429", retry_after=120.0))
    sleeps = Sleeps()
    with pytest.raises(RateLimited):
        await retry.call(fn, RetryPolicy(budget_s=10.0), sleep=sleeps)
    assert fn.calls == 1 and sleeps.delays == []


async def test_the_budget_bounds_the_whole_call_and_the_last_error_comes_out() -> None:
    policy = RetryPolicy(budget_s=0.4, base_s=0.05, max_wait_s=0.1)
    errors = [Transient(f"try {n}", status=502) for n in range(1000)]
    fn = Flaky(*errors)
    started = time.monotonic()
    with pytest.raises(Transient) as exc:
        await retry.call(fn, policy)
    elapsed = time.monotonic() - started
    assert elapsed < 0.4 + 0.05  # stop_before_delay: never sleeps past the budget
    assert fn.calls >= 4
    assert exc.value is errors[fn.calls - 1]


@pytest.mark.parametrize("attempts", [1, 2, 5])
async def test_max_attempts_counts_the_first_one(attempts: int) -> None:
    fn = Flaky(*(Transient("x") for _ in range(10)))
    with pytest.raises(Transient):
        await retry.call(fn, RetryPolicy(max_attempts=attempts, base_s=0.001), sleep=Sleeps())
    assert fn.calls == attempts


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="> 0"):
        RetryPolicy(budget_s=0)
    with pytest.raises(ValueError, match="> 0"):
        RetryPolicy(base_s=-1)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# -- cancellation --------------------------------------------------------------------------------
async def _cancel_soon(coro: Awaitable[object], after: float = 0.05) -> float:
    """Run ``coro`` as a task, cancel it after ``after`` s; seconds from cancel to its end."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(after)
    task.cancel()
    cancelled_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - cancelled_at


async def test_cancelling_during_the_first_backoff_is_prompt() -> None:
    fn = Flaky(*(Transient("x") for _ in range(5)))
    policy = RetryPolicy(budget_s=600.0, base_s=60.0, max_wait_s=60.0)
    # full jitter could draw a tiny first wait: a Retry-After floor makes it long for sure
    fn.errors[0] = RateLimited("429", retry_after=30.0)
    took = await _cancel_soon(retry.call(fn, policy))
    assert took < 0.1 and fn.calls == 1


async def test_cancelling_during_a_tenacity_backoff_is_prompt() -> None:
    fn = Flaky(Transient("x"), RateLimited("429", retry_after=30.0), Transient("x"))
    took = await _cancel_soon(retry.call(fn, RetryPolicy(base_s=0.001, budget_s=600.0)), 0.1)
    assert took < 0.1 and fn.calls == 2


async def test_cancelling_during_an_attempt_is_not_retried() -> None:
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(30)
        return "never"

    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Transient("x")
        return await slow()

    took = await _cancel_soon(retry.call(attempt, RetryPolicy(base_s=0.001)), 0.1)
    assert started.is_set() and took < 0.1 and calls == 2


async def test_a_cancelled_error_raised_by_an_attempt_is_let_through() -> None:
    fn = Flaky(Transient("x"), asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await retry.call(fn, FAST, sleep=Sleeps())
    assert fn.calls == 2


async def test_concurrent_calls_keep_their_own_state() -> None:
    def make(n: int) -> Callable[[], Awaitable[str]]:
        return Flaky(*(Transient(str(i)) for i in range(n)))

    results = await asyncio.gather(
        *(retry.call(make(n), RetryPolicy(base_s=0.001, max_wait_s=0.002)) for n in range(8))
    )
    assert [attempts for _, attempts in results] == [n + 1 for n in range(8)]


# -- the run's retry budget ------------------------------------------------------------------
async def test_a_run_budget_bounds_retries_across_calls() -> None:
    budget = RetryBudget(ratio=0.0, window_s=10.0, min_per_s=0.2)  # a reserve of 2 retries
    policy = RetryPolicy(budget_s=0.3, base_s=0.001, max_wait_s=0.002, run_budget=budget)
    fns = [Flaky(*(Transient(f"{n}") for n in range(100))) for _ in range(3)]
    outcomes = await asyncio.gather(*(retry.call(fn, policy) for fn in fns),
                                    return_exceptions=True)
    assert all(isinstance(o, Transient) for o in outcomes)  # each gave up with its last error
    assert sum(fn.calls for fn in fns) == 3 + 2  # three first attempts, the reserve's two
    assert budget.requests_total == 3 and budget.retries_total == 2
    assert budget.refused_total >= 1


async def test_a_spent_run_budget_makes_a_retry_wait_for_it() -> None:
    budget = RetryBudget(ratio=0.0, window_s=0.2, min_per_s=5.0, bins=2)  # 1 retry per 0.2 s
    policy = RetryPolicy(budget_s=5.0, base_s=0.001, max_wait_s=0.002, run_budget=budget)
    started = time.monotonic()
    results = await asyncio.gather(retry.call(Flaky(Transient("a")), policy),
                                   retry.call(Flaky(Transient("b")), policy))
    assert results == [("done", 2), ("done", 2)]
    assert time.monotonic() - started >= 0.05  # the second retry waited for the window
    assert budget.retries_total == 2


async def test_good_answers_let_a_retry_the_spent_run_budget_refused_go_at_once() -> None:
    """call() tells the run's budget how each attempt was answered: after five good answers
    in a row, a retry the spent window refuses may go at once; a bad answer puts the window
    back in charge (here the call gives up: the next probe is 100 s away)."""
    budget = RetryBudget(ratio=0.0, window_s=60.0, min_per_s=0.01)  # the window never has room
    budget.on_retry()  # the probe of the last 100 s is spent
    policy = RetryPolicy(budget_s=0.3, base_s=0.001, max_wait_s=0.002, run_budget=budget)
    refused = Flaky(Transient("a"))
    with pytest.raises(Transient):
        await retry.call(refused, policy)
    assert refused.calls == 1
    for _ in range(4):
        assert await retry.call(Flaky(), policy) == ("done", 1)
    assert not budget.healthy  # four good answers after a bad one
    assert await retry.call(Flaky(), policy) == ("done", 1)
    assert budget.healthy and budget.retry_delay() == 0.0
    with pytest.raises(NotFound):  # an answer from a working API: still well
        await retry.call(Flaky(NotFound("gone")), policy)
    assert budget.healthy
    again = Flaky(Transient("b"))
    with pytest.raises(Transient):  # its own bad answer ends the streak
        await retry.call(again, policy)
    assert again.calls == 1 and not budget.healthy
    assert budget.retries_total == 1 and budget.refused_total >= 2


async def test_successes_draw_nothing_from_the_run_budget() -> None:
    budget = RetryBudget(ratio=0.1, window_s=10.0, min_per_s=0.0)
    policy = RetryPolicy(run_budget=budget)
    for _ in range(20):
        assert await retry.call(Flaky(), policy) == ("done", 1)
    assert budget.requests_total == 20 and budget.retries_total == 0
    assert budget.allowance == pytest.approx(2.0)


async def test_a_reader_returns_the_result_alone_after_its_retries() -> None:
    flaky = Flaky(Transient("502", status=502), RateLimited("429", retry_after=0.0))
    seen: list[str] = []
    read = retry.Reader(FAST, on_retry=lambda exc, delay: seen.append(type(exc).__name__))
    assert await read(flaky) == "done"
    assert flaky.calls == 3 and seen == ["Transient", "RateLimited"]
    gone = Flaky(NotFound("gone", status=404))
    with pytest.raises(NotFound):
        await retry.Reader(FAST)(gone)
    assert gone.calls == 1

"""Run-level budgets (worker.budget): the retry budget and the circuit breaker on a fake clock;
then both wired into a run, against the simulator."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.chaos_harness import run_cli
from tests.helpers import FakeClock, NoLimiter
from worker import api, retry
from worker.budget import CircuitBreaker, RetryBudget, Trip
from worker.errors import Transient
from worker.retry import RetryPolicy
from worker.simulator import Faults, SimConfig, Simulator, SimulatorThread

SimFactory = Callable[[SimConfig | None], Awaitable[Simulator]]


# -- RetryBudget ---------------------------------------------------------------------------


def _budget(clock: FakeClock, **kw: float) -> RetryBudget:
    return RetryBudget(clock=clock, **kw)  # type: ignore[arg-type]


def test_reserve_allows_a_handful_of_retries_without_any_request() -> None:
    clock = FakeClock()
    budget = _budget(clock, ratio=0.1, window_s=10, min_per_s=1)
    taken = sum(budget.try_retry() for _ in range(50))
    assert taken == 10  # min_per_s * window_s
    assert not budget.can_retry()
    assert budget.refused_total == 40
    assert budget.retries_total == 10


def test_retries_limited_to_a_share_of_requests() -> None:
    clock = FakeClock()
    budget = _budget(clock, ratio=0.1, window_s=10, min_per_s=0)
    for _ in range(1000):
        budget.on_request()
    taken = sum(budget.try_retry() for _ in range(1000))
    assert taken == 100
    assert budget.allowance == pytest.approx(0.0)


def test_a_failing_api_sees_at_most_ratio_plus_reserve_extra() -> None:
    """Every request fails and wants up to 5 retries: the budget caps the extra load."""
    clock = FakeClock()
    budget = _budget(clock, ratio=0.1, window_s=10, min_per_s=10)
    sent = retries = 0
    for _ in range(60 * 100):  # 60 s at 100 first attempts a second
        clock.advance(0.01)
        budget.on_request()
        sent += 1
        for _ in range(5):
            if not budget.try_retry():
                break
            retries += 1
    # 10% of 6000 requests + 10 retries/s over 60 s (+ one window of slack at the start)
    assert retries <= 0.1 * sent + 10 * 60 + 10 * 10
    assert retries >= 0.1 * sent  # and it does allow what it promises
    assert budget.refused_total > 0


def test_window_slides_and_old_retries_leave_it() -> None:
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.0, window_s=10, min_per_s=1)  # 10 retries a window
    for _ in range(10):
        assert budget.try_retry()
    assert not budget.can_retry()
    assert budget.window_delay() == pytest.approx(10.0)
    clock.advance(5)
    assert not budget.can_retry()
    assert budget.window_delay() == pytest.approx(5.0)
    clock.advance(5)
    assert budget.can_retry()
    assert budget.window_delay() == 0.0


def test_retry_delay_counts_the_oldest_slots_first() -> None:
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.0, window_s=10, min_per_s=0.5)  # 5 a window
    for _ in range(2):
        budget.on_retry()
    clock.advance(3)
    for _ in range(3):
        budget.on_retry()
    assert not budget.can_retry()
    # the first two leave at t=10: then 3 in the window, 2 allowed
    assert budget.window_delay() == pytest.approx(7.0)
    clock.advance(7)
    assert budget.can_retry()


def test_requests_leaving_the_window_take_their_allowance_along() -> None:
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.5, window_s=10, min_per_s=0)
    for _ in range(10):
        budget.on_request()
    assert budget.allowance == pytest.approx(5.0)
    clock.advance(10)
    assert budget.allowance == pytest.approx(0.0)
    assert not budget.can_retry()
    assert budget.window_delay() == pytest.approx(10.0)  # nothing in the window will free one


def _storm(budget: RetryBudget, clock: FakeClock) -> int:
    """5 s of good traffic (100 first attempts a second), then a storm: every answer bad and
    every request retried until the budget refuses. Returns the retries it took."""
    for _ in range(500):
        clock.advance(0.01)
        budget.on_request()
        budget.on_answer(True)
    taken = 0
    for _ in range(100):
        clock.advance(0.001)
        budget.on_request()
        budget.on_answer(False)
        while budget.try_retry():
            budget.on_answer(False)
            taken += 1
    return taken


def test_good_answers_after_a_storm_release_the_retries_the_window_refuses() -> None:
    """A short storm overdraws the window for its whole 10 s; once the API answers well
    again, waiting retries go at once instead of waiting for the window to slide."""
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.1, window_s=10, min_per_s=10)
    taken = _storm(budget, clock)
    assert taken <= 0.1 * 600 + 100 + 1  # the storm itself got no more than the budget
    assert not budget.can_retry() and not budget.try_retry()
    assert budget.window_delay() > 4.0  # the window alone would hold them for seconds
    for good in range(1, 5):
        budget.on_answer(True)
        assert not budget.healthy, good
        assert not budget.try_retry()
    budget.on_answer(True)  # the fifth good answer in a row
    assert budget.healthy and budget.retry_delay() == 0.0
    assert sum(budget.try_retry() for _ in range(200)) == 200
    budget.on_answer(False)  # one bad answer and the window rules again
    assert not budget.healthy and not budget.try_retry()


def test_a_spent_window_still_lets_a_probe_through_every_tenth_of_a_second() -> None:
    """While the window refuses and the API answers badly, one retry goes every
    1 / min_per_s seconds, so a run whose every worker waits still learns it is back."""
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.1, window_s=10, min_per_s=10)
    _storm(budget, clock)
    assert 0.0 < budget.retry_delay() <= 0.1
    probes = 0
    for _ in range(300):  # 3 s, asked every 10 ms by many waiters at once
        clock.advance(0.01)
        for _ in range(8):
            if budget.try_retry():
                budget.on_answer(False)
                probes += 1
    assert 25 <= probes <= 31  # 10 a second (each asked at 10 ms ticks), not 8 waiters' worth


def test_without_a_reserve_no_probe_is_promised() -> None:
    """min_per_s=0: no probe ever goes, and retry_delay says so (it once read 0.0 before the
    first retry: -inf + inf is NaN, and max(0.0, NaN) is 0.0)."""
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.0, window_s=10, min_per_s=0)
    assert not budget.try_retry()
    assert budget.retry_delay() == budget.window_delay() == pytest.approx(10.0)


def test_a_failing_api_is_not_taken_for_a_healthy_one() -> None:
    """At 80% bad answers a run of five good ones is rare: over 10,000 answers the budget
    holds retries to its share (the bypass lets through at most a few waiters)."""
    rng = random.Random(7)
    clock = FakeClock(0.0)
    budget = _budget(clock, ratio=0.1, window_s=10, min_per_s=10)
    sent = retries = 0
    for _ in range(10_000):  # 100 s at 100 first attempts a second, each wanting a retry
        clock.advance(0.01)
        budget.on_request()
        sent += 1
        if rng.random() < 0.8:
            budget.on_answer(False)
            if budget.try_retry():
                retries += 1
                budget.on_answer(rng.random() >= 0.8)
        else:
            budget.on_answer(True)
    assert retries <= 0.1 * sent + 10 * 100 + 100 + 0.01 * sent


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": math.nan}, "ratio"),
        ({"window_s": 0}, "window_s"),
        ({"min_per_s": -1}, "min_per_s"),
        ({"min_per_s": math.nan}, "min_per_s"),
        ({"bins": 0}, "bins"),
        ({"healthy_after": 0}, "healthy_after"),
    ],
)
def test_retry_budget_refuses_bad_settings(kw: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RetryBudget(**kw)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["req", "retry", "wait"]), st.floats(0, 3)), max_size=300
    ),
    ratio=st.floats(0, 1),
    min_per_s=st.floats(0, 5),
)
def test_retries_in_any_window_never_exceed_the_budget(
    events: list[tuple[str, float]], ratio: float, min_per_s: float
) -> None:
    """Property: retries taken through try_retry within any window fit the formula, plus
    the probes (one each ``1 / min_per_s`` seconds at most) of an API that answers badly."""
    clock = FakeClock(0.0)
    window = 10.0
    budget = RetryBudget(ratio=ratio, window_s=window, min_per_s=min_per_s, bins=10, clock=clock)
    log: list[tuple[float, str]] = []
    for kind, gap in events:
        if kind == "wait":
            clock.advance(gap)
        elif kind == "req":
            budget.on_request()
            budget.on_answer(False)  # a failing API: nothing ever says it is well
            log.append((clock.now, "req"))
        elif budget.try_retry():
            budget.on_answer(False)
            log.append((clock.now, "retry"))
    # the budget's window is exact to one slot (1 s): check a window a slot shorter than its
    # own against a request count a slot longer, which bounds any window it could have used
    for t_end, kind in log:
        if kind != "retry":
            continue
        retries = sum(1 for t, k in log if k == "retry" and t_end - (window - 1) < t <= t_end)
        requests = sum(1 for t, k in log if k == "req" and t_end - (window + 1) < t <= t_end)
        probes = min_per_s * window + 1 if min_per_s > 0 else 0
        assert retries <= ratio * requests + min_per_s * window + probes + 1e-9


# -- CircuitBreaker ------------------------------------------------------------------------


def _breaker(clock: FakeClock, **kw: object) -> CircuitBreaker:
    return CircuitBreaker(clock=clock, **kw)  # type: ignore[arg-type]


def test_streak_of_the_same_transient_failure_trips_with_75() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, consecutive=5, min_failures=10_000)
    for status in (500, 502, 503, None):  # one reason, whatever the 5xx
        assert breaker.record("failed", "unreachable", status) is None
    trip = breaker.record("failed", "unreachable", 503)
    assert isinstance(trip, Trip)
    assert trip.exit_code == 75
    assert trip.reason == "unreachable"
    assert trip.failures == 5
    assert "unreachable" in trip.message
    # it stays open
    assert breaker.record("updated", None, 200) is trip
    assert breaker.tripped is trip


def test_every_patch_rejected_alike_trips_with_1() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, consecutive=50)
    trip = None
    for i in range(50):
        assert trip is None, i
        trip = breaker.record("failed", "rejected", 422)
    assert trip is not None
    assert trip.exit_code == 1
    assert (trip.reason, trip.http_status) == ("rejected", 422)
    assert "HTTP 422" in trip.message


def test_rate_limited_counts_as_transient() -> None:
    breaker = _breaker(FakeClock(), consecutive=3)
    for _ in range(2):
        assert breaker.record("failed", "rate_limited", 429) is None
    trip = breaker.record("failed", "rate_limited", 429)
    assert trip is not None and trip.exit_code == 75


def test_a_success_or_another_reason_breaks_the_streak() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, consecutive=3, min_failures=10_000)
    sequence = [
        ("failed", "rejected", 422), ("failed", "rejected", 422), ("updated", None, 200),
        ("failed", "rejected", 422), ("failed", "rejected", 403), ("failed", "rejected", 422),
        ("failed", "unreachable", 502), ("skipped", "read_only", None),
        ("failed", "rejected", 422), ("unchanged", None, None), ("failed", "rejected", 422),
        ("failed", "rejected", 422),
    ]
    for outcome in sequence:
        assert breaker.record(*outcome) is None, outcome
    assert breaker.record("failed", "rejected", 422) is not None


def test_per_image_failures_neither_trip_nor_break_a_streak() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, consecutive=3, min_failures=2, failure_ratio=0.5)
    for _ in range(500):
        assert breaker.record("failed", "not_found", 404) is None
        assert breaker.record("failed", "lock_timeout", 409) is None
        assert breaker.record("planned", None, None) is None
    assert breaker.record("failed", "unreachable", None) is None
    assert breaker.record("failed", "not_found", 404) is None
    assert breaker.record("updated", None, 200) is None
    assert breaker.tripped is None


def test_ratio_rule_trips_on_mixed_failures_within_the_window() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, consecutive=1000, window_s=60, failure_ratio=0.9, min_failures=100)
    trip = None
    n = 0
    # 1 success in 20; failures alternate so no streak ever reaches 1000
    while trip is None:
        n += 1
        clock.advance(0.01)
        if n % 20 == 0:
            trip = breaker.record("updated", None, 200)
        elif n % 3 == 0:
            trip = breaker.record("failed", "rejected", 403)
        else:
            trip = breaker.record("failed", "unreachable", 503)
        assert n < 1000
    assert trip.failures >= 100
    assert trip.reason == "unreachable"  # the most common one decides the exit code
    assert trip.exit_code == 75
    assert "failed within 60 s" in trip.message


def test_ratio_rule_forgets_outside_the_window() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, consecutive=1000, window_s=10, failure_ratio=0.5, min_failures=20)
    for _ in range(19):  # just under min_failures
        assert breaker.record("failed", "rejected", 422) is None
        clock.advance(0.1)
    breaker.record("updated", None, 200)
    clock.advance(11)  # those leave the window
    for _ in range(19):
        assert breaker.record("failed", "rejected", 422) is None
    assert breaker.record("failed", "rejected", 422) is not None


def test_healthy_run_with_scattered_failures_never_trips() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)  # the defaults
    for n in range(100_000):
        clock.advance(0.001)
        if n % 7 == 0:
            assert breaker.record("failed", "rejected", 422) is None
        else:
            assert breaker.record("updated", None, 200) is None
    assert breaker.tripped is None


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"consecutive": 0}, "consecutive"),
        ({"window_s": -1}, "window_s"),
        ({"failure_ratio": 0}, "failure_ratio"),
        ({"failure_ratio": 1.5}, "failure_ratio"),
        ({"min_failures": 0}, "min_failures"),
        ({"bins": 0}, "bins"),
            ],
)
def test_breaker_refuses_bad_settings(kw: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        CircuitBreaker(**kw)  # type: ignore[arg-type]


def test_custom_reason_sets() -> None:
    breaker = _breaker(FakeClock(), consecutive=2, ignore=(), transient=("not_found",))
    breaker.record("failed", "not_found", 404)
    trip = breaker.record("failed", "not_found", 404)
    assert trip is not None and trip.exit_code == 75


# -- wired into the run (README, reliability: RetryPolicy.run_budget, the pool's observe) --



async def test_retry_call_draws_on_the_run_budget(sim_factory: SimFactory) -> None:
    """40 reads against an API failing 80% of them: the run's budget, not each call, decides
    how many retries reach it."""
    sim = await sim_factory(SimConfig(
        images=60, faults=Faults(seed=3, p_5xx=0.8, methods=frozenset({"GET"}))
    ))
    keys = [(i["project_id"], i["region_id"], i["id"]) for i in sim.images()[:40]]
    budget = RetryBudget(ratio=0.1, window_s=60, min_per_s=0.5)  # a reserve of 30 retries
    policy = RetryPolicy(budget_s=2.0, base_s=0.01, max_wait_s=0.02, run_budget=budget)
    settings = api.Settings(base_url=sim.url, api_key="test-key-1234")
    async with api.Client.open(settings, NoLimiter()) as client:

        async def read(key: tuple[int, int, str]) -> object:
            return await retry.call(lambda: client.get_image(*key), policy)

        results = await asyncio.gather(*(read(k) for k in keys), return_exceptions=True)
    gets = sim.counters.requests["get"]
    assert budget.requests_total == len(keys)
    # retries: 10% plus the reserve, plus the probes (one each 2 s) of the calls' 2 s
    assert gets - len(keys) <= 0.1 * len(keys) + 30 + 2
    assert budget.refused_total > 0
    assert any(isinstance(r, Transient) for r in results)  # some calls gave up, as they must
    assert any(not isinstance(r, BaseException) for r in results)


class _RejectEveryPatch(Simulator):
    async def patch_image(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"message": "name: not allowed by policy", "exception_class": "ValidationError"},
            status=422,
        )


def test_a_run_whose_every_patch_is_rejected_stops_early(tmp_path: Path) -> None:
    config = SimConfig(images=1000)
    thread = SimulatorThread(config)
    thread.sim = _RejectEveryPatch(config)
    job = tmp_path / "job.yaml"
    job.write_text("name: breaker\ntargets:\n  - query: {projects: all, regions: all, "
                   "visibility: private}\nchanges:\n  set_tags: {a: b}\noptions:\n"
                   "  concurrency: 8\n")
    with thread:
        proc = run_cli("run", job, "--base-url", thread.url, "--state-dir", tmp_path / "s",
                       "--run-id", "breaker", env={"GCORE_API_KEY": "test-key-1234"},
                       timeout=90)
        patches = thread.call(lambda: thread.sim.counters.requests["patch"])
    assert proc.returncode == 1, proc.stderr
    assert "stopped: the last 50 targets all failed: rejected (HTTP 422)" in proc.stdout
    assert "run.circuit_open" in proc.stderr
    assert 50 <= patches <= 50 + 8 + 8  # the streak, plus what was in flight
    counts = json.loads((tmp_path / "s" / "breaker" / "summary.json").read_text())["counts"]
    assert counts["failed"] == patches
    assert counts["planned"] > 600  # left pending, for --resume once the job is fixed

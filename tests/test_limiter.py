"""The adaptive rate: the controller's arithmetic over a fake clock (no sleeping), the
aiolimiter it tunes, and one short real-time check that a rate is never exceeded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from worker.limiter import CEILING_BURST_SHARE, CEILING_SHARE, AdaptiveLimiter, RateController


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def answer(controller: RateController, clock: Clock, n: int, over: float) -> None:
    """``n`` accepted answers spread evenly over the next ``over`` seconds."""
    for _ in range(n):
        clock.advance(over / n)
        controller.on_success()


def saturated_step(controller: RateController, clock: Clock, seconds: float) -> bool:
    clock.advance(seconds + 1e-9)  # a hair over: float sums must not fall short of a step
    controller.on_wait()
    return controller.tick()


# -- slow start --------------------------------------------------------------------------------
def test_slow_start_doubles_each_step_while_answers_are_plentiful() -> None:
    clock = Clock()
    c = RateController(start=20.0, step_s=0.05, clock=clock)
    assert c.slow_start and c.rate == 20.0
    rates = []
    for _ in range(6):
        answer(c, clock, 200, 0.05)  # 4000 answers/s: twice that is no bound yet
        c.on_wait()
        assert c.tick()
        rates.append(c.rate)
    assert rates == [40.0, 80.0, 160.0, 320.0, 640.0, 1280.0]


def run_slow_start(c: RateController, clock: Clock, until: float, limit: float = 1e9) -> float:
    """Step 50 ms at a time, the API answering at once what was sent (at most ``limit``/s);
    the fake time it took the rate to reach ``until``."""
    started = clock.now
    while c.rate < until and clock.now - started < 10:
        before = c.rate
        answer(c, clock, max(1, round(min(c.rate, limit) * 0.05)), 0.05)
        c.on_wait()
        c.tick()
        assert before <= c.rate <= 2 * before  # never more than a doubling a step
    return clock.now - started


def test_slow_start_finds_a_high_rate_within_seconds() -> None:
    clock = Clock()
    c = RateController(start=20.0, step_s=0.05, clock=clock)
    took = run_slow_start(c, clock, 5000.0)
    assert c.slow_start and c.rate >= 5000.0
    assert took <= 3.0  # 20 -> 5000 is eight doublings


def test_slow_start_grows_no_faster_than_the_answers() -> None:
    clock = Clock()
    c = RateController(start=100.0, step_s=0.05, clock=clock)
    answer(c, clock, 6, 0.3)  # 20 answers/s come back: a slow API, or a long round trip
    assert not saturated_step(c, clock, 0.05)
    assert c.rate == 100.0  # twice 20/s is below the rate: hold
    answer(c, clock, 20, 0.2)  # now 100 answers/s
    assert saturated_step(c, clock, 0.05)
    assert 100.0 < c.rate <= 200.0


def test_no_growth_without_demand() -> None:
    clock = Clock()
    c = RateController(start=20.0, clock=clock)
    answer(c, clock, 10, 0.5)
    clock.advance(0.1)
    assert not c.tick()  # nobody had to wait: the rate is not what holds the run back
    assert c.rate == 20.0


def test_a_step_waits_for_step_s() -> None:
    clock = Clock()
    c = RateController(start=20.0, step_s=0.05, clock=clock)
    answer(c, clock, 10, 0.2)
    c.tick()  # not saturated: no change, but a step began
    assert not saturated_step(c, clock, 0.01)
    assert saturated_step(c, clock, 0.05)
    assert c.rate == 40.0


def test_the_first_429_ends_slow_start_at_what_was_just_accepted() -> None:
    clock = Clock()
    c = RateController(start=20.0, step_s=0.05, noise_count=1, noise_share=0.0, clock=clock)
    run_slow_start(c, clock, 600.0, limit=300.0)  # the API answers 300/s at most
    assert c.slow_start and c.rate >= 600
    assert c.on_throttled(sent_at=clock.now)
    assert not c.slow_start
    # 95% of the busiest recent 100 ms of answers: the API's pace as the limit was crossed
    assert c.rate == pytest.approx(0.95 * 300, rel=0.05)
    assert c.decreases == 1 and c.throttled == 1


def test_a_first_429_with_no_answer_to_go_by_halves() -> None:
    clock = Clock()
    c = RateController(start=100.0, noise_count=1, noise_share=0.0, clock=clock)
    clock.advance(2.0)
    assert c.on_throttled()
    assert c.rate == 50.0


def test_a_second_look_soon_after_the_first_cut_measures_the_limit() -> None:
    clock = Clock()
    c = RateController(1000.0, noise_count=1, noise_share=0.0, epoch_s=0.25, clock=clock)
    answer(c, clock, 800, 1.0)  # the server's burst: 800/s accepted so far
    cut_at = clock.now
    assert c.on_throttled(sent_at=cut_at)
    assert c.rate == pytest.approx(0.95 * 800, rel=0.05)
    # since the cut the API accepts 200/s and refuses the rest: it has shown its limit
    answer(c, clock, 12, 0.06)
    assert c.on_throttled(sent_at=cut_at + 0.01)  # 60 ms later, not an epoch: a second look
    assert c.rate == pytest.approx(0.95 * 200, rel=0.01)
    # ...and only one: the next cut waits an epoch, and is a plain one
    answer(c, clock, 10, 0.05)
    assert not c.on_throttled(sent_at=clock.now)
    clock.advance(0.25)
    before = c.rate
    assert c.on_throttled(sent_at=clock.now)
    assert c.rate == pytest.approx(before * c.decrease)


def settled(rate: float, clock: Clock, **kw: Any) -> RateController:
    """A controller past its run's first cut (and that cut's second look), at about
    ``rate``, with a full second of answers behind it."""
    c = RateController(rate, noise_count=1, noise_share=0.0, clock=clock, **kw)
    answer(c, clock, int(rate), 1.0)
    assert c.on_throttled()
    clock.advance(1.1)  # no second 429 came: the first cut was enough
    answer(c, clock, int(c.rate), 1.0)
    return c


def test_a_429_cuts_by_decrease() -> None:
    clock = Clock()
    c = settled(400.0, clock)
    rate = c.rate
    assert rate == pytest.approx(0.95 * 400, rel=0.03) and not c.slow_start
    assert c.on_throttled(sent_at=clock.now)
    assert c.rate == pytest.approx(rate * c.decrease)


def test_one_cut_per_epoch() -> None:
    clock = Clock()
    c = settled(400.0, clock, epoch_s=0.25)
    cut_at = clock.now
    assert c.on_throttled(sent_at=cut_at - 0.01)
    after_one = c.rate
    # more 429s in the same epoch, or to requests sent before the cut: no further cut
    for _ in range(20):
        clock.advance(0.01)
        assert not c.on_throttled(sent_at=clock.now)
    clock.advance(0.5)
    assert not c.on_throttled(sent_at=cut_at - 0.001)
    assert c.rate == after_one
    # a 429 to a request sent after the cut, an epoch later: cut again
    assert c.on_throttled(sent_at=cut_at + 0.3)
    assert c.rate == pytest.approx(after_one * c.decrease)
    assert c.decreases == 3 and c.throttled == 24


def test_without_a_send_time_the_epoch_is_time_alone() -> None:
    clock = Clock()
    c = settled(400.0, clock, epoch_s=0.25)
    rate = c.rate
    assert c.on_throttled()
    clock.advance(0.2)
    assert not c.on_throttled()
    clock.advance(0.06)
    assert c.on_throttled()
    assert c.rate == pytest.approx(rate * c.decrease**2)


def test_a_stray_429_is_not_a_limit() -> None:
    clock = Clock()
    c = RateController(1000.0, clock=clock)  # the default filter: 3 a second, and over 2%
    answer(c, clock, 500, 1.0)
    assert not c.on_throttled()
    assert not c.on_throttled()
    assert c.rate == 1000.0 * CEILING_SHARE and c.throttled == 2
    assert not c.on_throttled()  # 3 in a second, but 3 of 503 is under 2%
    for _ in range(8):
        c.on_throttled()
    assert c.decreases == 1  # 11 of 511 is over 2%: a limit, one cut
    assert c.rate < 1000.0 * CEILING_SHARE


def test_the_floor_holds() -> None:
    clock = Clock()
    c = settled(40.0, clock, floor=2.0)
    for _ in range(40):
        clock.advance(0.5)
        c.on_throttled()
    assert c.rate == 2.0


# -- additive increase ------------------------------------------------------------------------
def test_additive_increase_climbs_back_linearly_then_stops_at_the_ceiling() -> None:
    clock = Clock()
    c = settled(500.0, clock, increase_per_s=0.08, step_s=0.05)
    top = c.rate
    assert c.on_throttled()
    assert c.rate == pytest.approx(top * c.decrease)
    gains = []
    while c.rate < top:
        before = c.rate
        assert saturated_step(c, clock, 0.05)
        gains.append(c.rate - before)
    # the same gain each step (additive): 8% a second of the rate the cut interrupted
    assert all(g == pytest.approx(0.08 * top * 0.05) for g in gains[:-1])
    # back in (1 - decrease) / increase_per_s seconds
    assert len(gains) * 0.05 == pytest.approx((1 - c.decrease) / 0.08, abs=0.06)
    for _ in range(200):
        saturated_step(c, clock, 0.05)
    assert c.rate == 500.0 * CEILING_SHARE  # up to the ceiling, never above


def test_the_slope_of_an_episode_comes_from_where_it_began() -> None:
    clock = Clock()
    c = settled(1000.0, clock, epoch_s=0.25, increase_per_s=0.1)
    top = c.rate
    for _ in range(4):  # one episode: four cuts 0.3 s apart
        clock.advance(0.3)
        assert c.on_throttled()
    low = c.rate
    assert low == pytest.approx(top * c.decrease**4)
    assert saturated_step(c, clock, 0.05)
    assert c.rate - low == pytest.approx(0.1 * top * 0.05)


def test_an_idle_spell_earns_no_climb() -> None:
    clock = Clock()
    c = settled(100.0, clock, step_s=0.05, increase_per_s=0.1)
    assert c.on_throttled()
    low = c.rate
    clock.advance(600.0)  # ten idle minutes, then one saturated step
    assert saturated_step(c, clock, 0.05)
    assert 0 < c.rate - low <= 0.1 * 100.0 * 4 * 0.05


def test_a_known_ceiling_is_never_exceeded() -> None:
    clock = Clock()
    c = RateController(200.0, clock=clock)
    assert not c.slow_start and c.rate == c.maximum == 200.0 * CEILING_SHARE
    for n in range(3000):
        clock.advance(0.01)
        c.on_success()
        c.on_wait()
        c.tick()
        if n % 500 == 0:
            for _ in range(10):
                c.on_throttled()
        assert c.rate <= 200.0 * CEILING_SHARE
    assert c.decreases >= 1 and c.rate == 200.0 * CEILING_SHARE


def test_validation() -> None:
    with pytest.raises(ValueError, match="ceiling"):
        RateController(0)
    with pytest.raises(ValueError, match="decrease"):
        RateController(decrease=1.0)
    with pytest.raises(ValueError, match="> 0"):
        RateController(start=0)
    with pytest.raises(ValueError, match="burst_s"):
        AdaptiveLimiter(RateController(), burst_s=0)


# -- the aiolimiter it tunes ------------------------------------------------------------------
def consistent(limiter: AdaptiveLimiter) -> None:
    lim = limiter._limiter
    capacity, period = limiter.shape
    bucket = limiter.rate * limiter.burst_s
    ceiling = limiter.controller.ceiling
    if ceiling is not None:  # under a known ceiling the bucket holds at most 1% of it
        bucket = min(bucket, ceiling * CEILING_BURST_SHARE)
    assert capacity == max(1.0, bucket)
    assert capacity / period == pytest.approx(limiter.rate)
    assert lim._rate_per_sec == pytest.approx(limiter.rate)
    assert 0 <= lim._level <= capacity


async def test_retune_keeps_the_aiolimiter_consistent() -> None:
    clock = Clock()
    controller = RateController(1000.0, noise_count=1, noise_share=0.0, clock=clock)
    limiter = AdaptiveLimiter(controller, burst_s=0.015)
    consistent(limiter)
    for _ in range(10):  # fill the bucket
        await limiter.acquire()
    for _ in range(6):  # cut after cut: the bucket shrinks under its level
        answer(controller, clock, 300, 0.3)
        limiter.throttled(sent_at=clock.now)
        consistent(limiter)
    assert controller.decreases == 6 and controller.rate > 300
    low = controller.rate
    for _ in range(100):  # and back up
        clock.advance(0.05)
        limiter.success()
        await limiter.acquire()
        consistent(limiter)
    assert controller.rate > low


async def test_a_waiter_sees_a_cut_at_once() -> None:
    clock = Clock()
    controller = RateController(1000.0, noise_count=1, noise_share=0.0, clock=clock)
    limiter = AdaptiveLimiter(controller)
    while limiter._limiter.has_capacity():
        await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    for _ in range(50):
        clock.advance(0.3)
        limiter.throttled()
    assert controller.rate == controller.floor
    # at 1 request/s the waiter now needs about a second: it must not pass in 0.1 s
    done, _ = await asyncio.wait({waiter}, timeout=0.1)
    assert not done
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_no_burst_at_start() -> None:
    limiter = AdaptiveLimiter(RateController(10.0))
    passed = 0

    async def take() -> None:
        nonlocal passed
        await limiter.acquire()
        passed += 1

    tasks = [asyncio.create_task(take()) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert passed <= 2  # a 10/s limiter lets one through at once, not ten
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timing
@pytest.mark.parametrize("rate", [50.0, 400.0])
async def test_no_one_second_window_above_the_rate(rate: float) -> None:
    limiter = AdaptiveLimiter(RateController(rate))
    stamps: list[float] = []
    stop = False

    async def worker() -> None:
        while not stop:
            await limiter.acquire()
            stamps.append(time.monotonic())

    started = time.monotonic()
    tasks = [asyncio.create_task(worker()) for _ in range(32)]
    await asyncio.sleep(2.5)
    stop = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    worst, j = 0, 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    steady = sum(1 for t in stamps if 0.5 <= t - started < 2.5) / 2.0
    assert worst <= rate
    assert steady >= rate * 0.9  # and it does not fall far short either

"""The adaptive rate: the controller's arithmetic over a fake clock (no sleeping; against a
modelled server: a step down, a step up, a storm, stated limits), the bucket it drives, and
one short real-time check that a rate is never exceeded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.helpers import FakeClock
from worker.limiter import CEILING_SHARE, STATED_SHARE, RateController
from worker.pacer import AdaptiveLimiter, Pacer
from worker.rate_headers import Stated


def answer(controller: RateController, clock: FakeClock, n: int, over: float) -> None:
    """``n`` accepted answers spread evenly over the next ``over`` seconds."""
    for _ in range(n):
        clock.advance(over / n)
        controller.on_success()


def saturated_step(controller: RateController, clock: FakeClock, seconds: float) -> bool:
    clock.advance(seconds + 1e-9)  # a hair over: float sums must not fall short of a step
    controller.on_wait()
    return controller.tick()


# -- slow start --------------------------------------------------------------------------------
def test_slow_start_doubles_each_step_while_answers_are_plentiful() -> None:
    clock = FakeClock()
    c = RateController(start=20.0, step_s=0.05, clock=clock)
    assert c.slow_start and c.rate == 20.0
    rates = []
    for _ in range(6):
        answer(c, clock, 200, 0.05)  # 4000 answers/s: twice that is no bound yet
        c.on_wait()
        assert c.tick()
        rates.append(c.rate)
    assert rates == [40.0, 80.0, 160.0, 320.0, 640.0, 1280.0]


def run_slow_start(c: RateController, clock: FakeClock, until: float, limit: float = 1e9) -> float:
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
    clock = FakeClock()
    c = RateController(start=20.0, step_s=0.05, clock=clock)
    took = run_slow_start(c, clock, 5000.0)
    assert c.slow_start and c.rate >= 5000.0
    assert took <= 3.0  # 20 -> 5000 is eight doublings


def test_slow_start_grows_no_faster_than_the_answers() -> None:
    clock = FakeClock()
    c = RateController(start=100.0, step_s=0.05, clock=clock)
    answer(c, clock, 6, 0.3)  # 20 answers/s come back: a slow API, or a long round trip
    assert not saturated_step(c, clock, 0.05)
    assert c.rate == 100.0  # twice 20/s is below the rate: hold
    answer(c, clock, 20, 0.2)  # now 100 answers/s
    assert saturated_step(c, clock, 0.05)
    assert 100.0 < c.rate <= 200.0


def test_no_growth_without_demand() -> None:
    clock = FakeClock()
    c = RateController(start=20.0, clock=clock)
    answer(c, clock, 10, 0.5)
    clock.advance(0.1)
    assert not c.tick()  # nobody had to wait: the rate is not what holds the run back
    assert c.rate == 20.0


def test_a_step_waits_for_step_s() -> None:
    clock = FakeClock()
    c = RateController(start=20.0, step_s=0.05, clock=clock)
    answer(c, clock, 10, 0.2)
    c.tick()  # not saturated: no change, but a step began
    assert not saturated_step(c, clock, 0.01)
    assert saturated_step(c, clock, 0.05)
    assert c.rate == 40.0


def test_the_first_429_ends_slow_start_at_what_was_just_accepted() -> None:
    clock = FakeClock()
    c = RateController(start=20.0, step_s=0.05, noise_count=1, noise_share=0.0, clock=clock)
    run_slow_start(c, clock, 600.0, limit=300.0)  # the API answers 300/s at most
    assert c.slow_start and c.rate >= 600
    assert c.on_throttled(sent_at=clock.now)
    assert not c.slow_start
    # 95% of the busiest recent 100 ms of answers: the API's pace as the limit was crossed
    assert c.rate == pytest.approx(0.95 * 300, rel=0.05)
    assert c.decreases == 1 and c.throttled == 1


def test_a_first_429_with_no_answer_to_go_by_halves() -> None:
    clock = FakeClock()
    c = RateController(start=100.0, noise_count=1, noise_share=0.0, clock=clock)
    clock.advance(2.0)
    assert c.on_throttled()
    assert c.rate == 50.0


def test_a_second_look_soon_after_the_first_cut_measures_the_limit() -> None:
    clock = FakeClock()
    c = RateController(1000.0, noise_count=1, noise_share=0.0, epoch_s=0.25, clock=clock)
    answer(c, clock, 800, 1.0)  # the server's burst: 800/s accepted so far
    cut_at = clock.now
    assert c.on_throttled(sent_at=cut_at)
    assert c.rate == pytest.approx(0.95 * 800, rel=0.05)
    # since the cut the API accepts 200/s and refuses the rest: it has shown its limit (to a
    # run that presses on the rate: its requests wait for slots)
    c.on_wait()
    answer(c, clock, 12, 0.06)
    assert c.on_throttled(sent_at=cut_at + 0.01)  # 60 ms later, not an epoch: a second look
    assert c.rate == pytest.approx(0.95 * 200, rel=0.01)
    # ...and only one: the next cut waits an epoch, and is a plain one
    c.on_wait()
    answer(c, clock, 10, 0.05)
    assert not c.on_throttled(sent_at=clock.now)
    for _ in range(45):  # the rest of the 190/s refused: a limit near 33/s
        c.on_throttled(sent_at=cut_at + 0.02)
    clock.advance(0.25)
    before = c.rate
    assert c.on_throttled(sent_at=clock.now)  # 10 accepted in the 0.3 s since: 95% of that
    assert c.rate == pytest.approx(0.95 * 10 / 0.3, rel=0.01)
    assert c.rate < before


def test_answers_to_a_run_that_did_not_press_cut_by_half_at_most() -> None:
    """Few answers came back because the run's own requests were away (waiting out their
    Retry-After, a slow spell), not because the API accepts so few: with no request waiting
    for a slot, a cut halves at most, in slow start's last cut as after it (chaos seed 45
    once cut to 9.5/s this way and took seconds to climb back)."""
    clock = FakeClock()
    c = RateController(start=20.0, step_s=0.05, noise_count=1, noise_share=0.0, clock=clock)
    run_slow_start(c, clock, 800.0)
    clock.advance(0.3)  # the run's requests wait out a Retry-After: nobody waits for a slot
    answer(c, clock, 2, 0.1)  # 20/s came back meanwhile
    rate = c.rate
    assert c.on_throttled(sent_at=clock.now)
    assert c.rate == pytest.approx(rate / 2)
    clock.advance(0.06)
    answer(c, clock, 3, 0.05)
    assert c.on_throttled(sent_at=clock.now)  # the second look: still nobody pressed
    assert c.rate == pytest.approx(rate / 4)
    # pressed, the same answers are the API's word: land at 95% of them
    c.on_wait()
    clock.advance(0.3)
    answer(c, clock, 30, 0.1)
    before = c.rate
    assert c.on_throttled(sent_at=clock.now)
    assert c.rate < before / 2


def settled(rate: float, clock: FakeClock, **kw: Any) -> RateController:
    """A controller past its run's first cut (and that cut's second look), at about
    ``rate``, with a full second of answers behind it."""
    c = RateController(rate, noise_count=1, noise_share=0.0, clock=clock, **kw)
    answer(c, clock, int(rate), 1.0)
    assert c.on_throttled()
    clock.advance(1.1)  # no second 429 came: the first cut was enough
    answer(c, clock, int(c.rate), 1.0)
    return c


def test_one_cut_per_epoch_and_none_for_requests_sent_before_it() -> None:
    clock = FakeClock()
    c = settled(400.0, clock, epoch_s=0.25)
    answer(c, clock, 200, 0.5)
    cut_at = clock.now
    assert c.on_throttled(sent_at=cut_at - 0.01)  # a new episode: a cut
    after_one = c.rate
    assert after_one < 400 * 0.95
    answer(c, clock, 20, 0.06)  # the API still accepts about as much: no storm
    assert c.on_throttled(sent_at=clock.now)  # the second look, 60 ms on
    after_two = c.rate
    for _ in range(10):  # the same epoch: no further cut
        answer(c, clock, 3, 0.01)
        assert not c.on_throttled(sent_at=clock.now)
    assert not c.on_throttled(sent_at=cut_at - 0.001)  # sent before a cut: nothing new
    assert c.rate == after_two
    clock.advance(0.2)
    assert c.on_throttled(sent_at=clock.now)  # an epoch on: again
    assert c.decreases == 4 and c.throttled == 15


def test_a_stray_429_is_not_a_limit() -> None:
    clock = FakeClock()
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
    clock = FakeClock()
    c = settled(40.0, clock, floor=2.0)
    for _ in range(40):
        clock.advance(0.5)
        c.on_throttled()
    assert c.rate == 2.0


# -- the controller against a modelled server, on the fake clock -------------------------------
class Server:
    """A token bucket whose rate follows ``schedule`` ((from second, limit); 0 refuses all),
    burst one second of it, answering at once. ``drive`` sends at the controller's rate."""

    def __init__(
        self, schedule: list[tuple[float, float]], proxy: tuple[float, float] | None = None,
        away: tuple[float, float] | None = None, accept_one_in: int = 3,
    ) -> None:
        self.schedule = schedule
        self.proxy = proxy  # (from, to) seconds: a proxy refuses all but one in accept_one_in
        self.accept_one_in = accept_one_in
        # (from, to) seconds: the run's requests are away (waiting out their Retry-After):
        # it sends a twentieth of its rate and nobody waits for a slot
        self.away = away
        self.sent = 0
        self.tokens = schedule[0][1]
        self.limit = schedule[0][1]
        self.ok: list[int] = []  # accepted, per 100 ms
        self.refused: list[int] = []

    def limit_at(self, t: float) -> float:
        return [v for at, v in self.schedule if t >= at][-1]

    def drive(self, c: RateController, clock: FakeClock, seconds: float, dt: float = 0.002) -> None:
        start, due = clock.now, 0.0
        while clock.now - start < seconds:
            t = clock.now - start
            limit = self.limit_at(t)
            if limit != self.limit:
                self.tokens = min(self.tokens, limit)
                self.limit = limit
            self.tokens = min(max(limit, 1.0), self.tokens + limit * dt)
            bin_ = int(t * 10)
            while len(self.ok) <= bin_:
                self.ok.append(0)
                self.refused.append(0)
            away = self.away is not None and self.away[0] <= t < self.away[1]
            due += c.rate * dt * (0.05 if away else 1.0)
            while due >= 1.0:
                due -= 1.0
                self.sent += 1
                proxy = self.proxy is not None and self.proxy[0] <= t < self.proxy[1]
                if proxy and self.sent % self.accept_one_in:
                    self.refused[bin_] += 1
                    c.on_throttled(sent_at=clock.now)
                elif limit > 0 and self.tokens >= 1.0:
                    self.tokens -= 1.0
                    self.ok[bin_] += 1
                    c.on_success()
                else:
                    self.refused[bin_] += 1
                    c.on_throttled(sent_at=clock.now)
            if not away:
                c.on_wait()  # demand exceeds the rate
            c.tick()
            clock.advance(dt)

    def accepted(self, t0: float, t1: float) -> float:
        """Accepted per second from ``t0`` to ``t1`` (whole 100 ms bins)."""
        bins = self.ok[round(t0 * 10):round(t1 * 10)]
        return sum(bins) / (len(bins) / 10)

    def back_after(self, at: float, share: float = 0.9) -> float:
        """Seconds from ``at`` until a 300 ms stretch is accepted at ``share`` of the limit."""
        limit = self.limit_at(at)
        for k in range(round(at * 10), len(self.ok) - 2):
            if sum(self.ok[k:k + 3]) / 0.3 >= share * limit:
                return k / 10 + 0.3 - at
        return float("inf")


def test_step_down_lands_near_what_the_api_now_accepts() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    server = Server([(0.0, 150.0), (5.0, 30.0)])
    server.drive(c, clock, 9.0)
    assert server.accepted(3.0, 5.0) >= 0.95 * 150
    # within half a second of the drop the rate is near 30/s, not far below it
    assert 0.8 * 30 <= server.accepted(5.5, 9.0) <= 31
    assert sum(server.refused[50:55]) <= 35  # the drop's 429s: its first half second
    assert sum(server.refused[55:90]) <= 15  # then a probe's few now and then


def test_step_up_climbs_back_to_what_worked_before() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    server = Server([(0.0, 150.0), (5.0, 30.0), (9.0, 150.0)])
    server.drive(c, clock, 14.0)
    assert server.back_after(9.0) <= 2.0  # back to 90% of the limit within 2 s
    assert server.accepted(11.0, 14.0) >= 0.95 * 150
    assert sum(server.refused[90:140]) <= 25


def test_a_storm_refusing_everything_costs_little_and_the_climb_is_quick() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    server = Server([(0.0, 150.0), (5.0, 0.0), (5.5, 150.0)])
    server.drive(c, clock, 9.0)
    assert min(c.rate, 1e9) >= c.floor
    assert sum(server.refused[50:56]) <= 30  # the storm's 429s
    assert server.back_after(5.5) <= 1.5
    assert server.accepted(7.0, 9.0) >= 0.95 * 150


def test_a_proxy_refusing_a_share_at_random_is_not_a_limit() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    server = Server([(0.0, 200.0)], proxy=(4.0, 4.9))  # 2 in 3 refused, whatever the rate
    server.drive(c, clock, 8.0)
    assert server.accepted(3.0, 4.0) >= 0.95 * 200
    # cutting cannot help: the rate holds above a fifth of the limit, not near the floor...
    assert server.accepted(4.3, 4.9) >= 0.2 * 200 / 3
    assert server.back_after(4.9) <= 2.0  # ...and is back within 2 s of the storm's end


def test_a_share_refused_after_a_spell_away_does_not_make_the_run_forget_its_rate() -> None:
    """Chaos seed 45: the run's requests wait out a Retry-After (it asks little), then a
    proxy refuses one in two whatever the rate. The episode began as the run came back, so
    what the API accepted "as it began" was the run's own trickle; once the cuts show a
    share refused, the climb back must aim at what the API accepted before (1,000/s), not at
    that trickle (it did, and the run spent seconds at a fifth of the limit)."""
    clock = FakeClock()
    c = RateController(clock=clock)
    server = Server([(0.0, 1000.0)], away=(4.0, 4.9), proxy=(4.9, 6.0), accept_one_in=2)
    server.drive(c, clock, 9.0)
    assert server.accepted(3.0, 4.0) >= 0.95 * 1000
    assert server.back_after(6.0) <= 1.5


def test_a_first_cut_that_measured_a_slow_spell_climbs_back_to_what_slow_start_saw() -> None:
    """Chaos seed 45 again: slow start reached 1,200/s with every request accepted; then
    the answers slowed (a latency storm) and the first 429 came from a proxy's storm, so both
    of the first episode's looks measured a trickle. After a calm second the run climbs back
    to the busiest rate the API accepted before its first 429 (once), within seconds, not
    along the slow probe above a limit."""
    clock = FakeClock()
    c = RateController(start=20.0, step_s=0.05, noise_count=1, noise_share=0.0, clock=clock)
    run_slow_start(c, clock, 1200.0)
    answer(c, clock, 240, 0.2)  # 200 ms at 1,200/s, all accepted
    for _ in range(6):  # 300 ms of slow answers: 60/s come back while the run presses
        c.on_wait()
        answer(c, clock, 3, 0.05)
    for _ in range(5):
        c.on_throttled(sent_at=clock.now)
    assert c.rate < 100  # the first cut measured the slow spell
    c.on_wait()
    answer(c, clock, 1, 0.06)
    for _ in range(10):  # the second look: a storm still refusing nearly everything
        c.on_throttled(sent_at=clock.now)
    low = c.rate
    assert low < 200
    server = Server([(0.0, 5000.0)])  # calm: the API accepts whatever is sent
    server.drive(c, clock, 3.0)
    assert server.back_after(0.0, share=900 / 5000) <= 2.5
    assert sum(server.refused) == 0
    # once: a real limit met on the way ends it, and the run stays near that limit
    server = Server([(0.0, 600.0)])
    server.drive(c, clock, 3.0)
    assert server.accepted(1.5, 3.0) >= 0.9 * 600
    assert sum(server.refused) <= 40


def test_without_memory_the_probe_above_a_steady_limit_is_slow() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    server = Server([(0.0, 150.0)])
    server.drive(c, clock, 20.0)
    assert server.accepted(3.0, 20.0) >= 0.97 * 150
    assert sum(server.refused[30:200]) <= 25  # a 429 or two a second at most, steady


def test_an_idle_spell_earns_no_climb() -> None:
    clock = FakeClock()
    c = settled(100.0, clock, step_s=0.05)
    answer(c, clock, 90, 0.5)
    assert c.on_throttled()
    low = c.rate
    clock.advance(600.0)  # ten idle minutes, then one saturated step
    assert saturated_step(c, clock, 0.05)
    assert 0 < c.rate - low <= 0.2 * c._w


# -- a limit the API states --------------------------------------------------------------------
def test_a_stated_limit_is_run_at_99_percent_from_the_first_answer() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    assert c.slow_start
    assert c.on_stated(Stated(150.0, 1.0, 140.0, 1.0))
    assert not c.slow_start and c.rate == pytest.approx(STATED_SHARE * 150)
    assert not c.on_stated(Stated(150.0, 1.0, 3.0, 1.0))  # short windows: Remaining ignored
    assert c.on_stated(Stated(100.0, 1.0))  # a lower limit: followed at once
    assert c.rate == pytest.approx(STATED_SHARE * 100)
    for _ in range(100):  # and never climbed past
        saturated_step(c, clock, 0.05)
    assert c.rate == pytest.approx(STATED_SHARE * 100)


def test_x_ratelimit_without_a_window_takes_the_longest_reset() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    c.on_stated(Stated(200.0, None, 199.0, 1.0))
    assert c.rate == pytest.approx(STATED_SHARE * 200)
    c.on_stated(Stated(1200.0, None, 1190.0, 60.0))  # a minute's window shows itself
    assert c.rate == pytest.approx(STATED_SHARE * 20, rel=0.01)


def test_a_windowed_quota_is_paced_across_its_window() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    c.on_stated(Stated(1200.0, 300.0, 1199.0, 300.0))
    assert c.rate == pytest.approx(STATED_SHARE * 4.0, rel=0.01)  # 1,200 / 5 minutes, evenly
    c.on_stated(Stated(1200.0, 300.0, 300.0, 200.0))  # another client took most of it
    assert c.rate == pytest.approx(STATED_SHARE * 1.5, rel=0.01)
    c.on_stated(Stated(1200.0, 300.0, 1199.0, 300.0))  # a new window
    assert c.rate == pytest.approx(STATED_SHARE * 4.0, rel=0.01)


def test_a_known_ceiling_caps_a_stated_limit() -> None:
    clock = FakeClock()
    c = RateController(50.0, clock=clock)
    c.on_stated(Stated(150.0, 1.0))
    assert c.rate == pytest.approx(CEILING_SHARE * 50)


def test_a_stated_limit_against_a_modelled_server_sees_no_429() -> None:
    clock = FakeClock()
    c = RateController(clock=clock)
    c.on_stated(Stated(150.0, 1.0))
    server = Server([(0.0, 150.0)])
    server.tokens = 0.0  # not even the server's burst to hide behind
    server.drive(c, clock, 5.0)
    assert sum(server.refused) == 0
    assert server.accepted(0.0, 5.0) >= 0.97 * 150

def test_a_known_ceiling_is_never_exceeded() -> None:
    clock = FakeClock()
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
    with pytest.raises(ValueError, match="probe_s"):
        RateController(probe_s=0)
    with pytest.raises(ValueError, match="> 0"):
        RateController(start=0)
    with pytest.raises(ValueError, match="burst_s"):
        AdaptiveLimiter(RateController(), burst_s=0)


# -- the bucket it drives ----------------------------------------------------------------------
async def test_a_waiter_sees_a_cut_at_once() -> None:
    clock = FakeClock()
    controller = RateController(100.0, noise_count=1, noise_share=0.0, clock=clock)
    limiter = AdaptiveLimiter(controller)  # 98/s, one slot at a time
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())  # its slot: about 10 ms on
    await asyncio.sleep(0)
    for _ in range(50):
        clock.advance(0.3)
        limiter.throttled()
    assert controller.rate == controller.floor
    assert limiter.shape == (1.0, pytest.approx(controller.floor))
    # at 1 request/s the waiter now needs about a second: it must not pass in 0.1 s
    done, _ = await asyncio.wait({waiter}, timeout=0.1)
    assert not done
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not limiter._pacer._waiters  # a cancelled waiter leaves the queue


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


async def test_waiters_are_served_in_order() -> None:
    pacer = Pacer(200.0)
    order: list[int] = []

    async def take(i: int) -> None:
        await pacer.acquire()
        order.append(i)

    tasks = [asyncio.create_task(take(i)) for i in range(20)]
    await asyncio.gather(*tasks)
    assert order == list(range(20))


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


def test_one_of_n_shards_takes_its_share_of_a_stated_limit() -> None:
    clock = FakeClock()
    c = RateController(clock=clock, share=1 / 4)
    c.on_stated(Stated(200.0, 1.0))
    assert c.rate == pytest.approx(STATED_SHARE * 50)


def test_a_waiter_under_uvloop_is_woken_a_few_times_not_spun_for() -> None:
    # uvloop counts a timer's delay in whole milliseconds: a pacer that armed its timer for
    # the sub-millisecond rest of a wait was woken at once, again and again, until the slot
    # was due (~45 wake-ups a waiter in a run's slow start); where missed slots are caught
    # up it waits a millisecond instead, and the slots keep their times
    uvloop = pytest.importorskip("uvloop")
    pacer = Pacer(500.0, catchup_s=0.02)
    wakeups = 0
    release = pacer._release

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        release()

    pacer._release = counted  # type: ignore[method-assign]
    order: list[int] = []

    async def take(i: int) -> None:
        await pacer.acquire()
        order.append(i)

    async def main() -> float:
        started = time.monotonic()
        await asyncio.gather(*(take(i) for i in range(40)))
        return time.monotonic() - started

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        took = runner.run(main())
    assert order == list(range(40))
    assert took >= 39 / 500 * 0.95  # the slots keep their spacing: nothing given early
    assert wakeups <= 3 * 40, wakeups

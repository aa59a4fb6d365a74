"""Stated limits end to end: the header forms read (``worker.rate_headers``), the simulator's
limits (schedule, storm, windowed quota, each header style), and a run's client and limiter
against a simulator that states its limit: no 429, at 99% of it from the first answers."""

from __future__ import annotations

import asyncio
import time

import pytest
from multidict import CIMultiDict

from tests.conftest import SimFactory
from worker.api import Client, Settings
from worker.limiter import STATED_SHARE, RateController
from worker.pacer import AdaptiveLimiter
from worker.rate_headers import Stated, stated
from worker.simulator import Faults, SimConfig
from worker.simulator.limits import Limits


def h(**fields: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in fields.items()})


# -- the forms read ----------------------------------------------------------------------------
@pytest.mark.parametrize(("headers", "expected"), [
    (h(RateLimit_Policy='"default";q=1200;w=300', RateLimit='"default";r=1100;t=240'),
     Stated(1200, 300, 1100, 240)),
    (h(RateLimit_Policy='"burst";q=100;w=1, "day";q=5000;w=86400'), Stated(5000, 86400)),
    (h(RateLimit_Policy="100;w=60", RateLimit_Remaining="40", RateLimit_Reset="7"),
     Stated(100, 60, 40, 7)),
    (h(ratelimit_policy='"p";q=10'), Stated(10, 1.0)),  # names are case-insensitive
    (h(X_RateLimit_Limit="150", X_RateLimit_Remaining="149", X_RateLimit_Reset="1"),
     Stated(150, None, 149, 1)),
    (h(X_RateLimit_Limit="5000", X_RateLimit_Reset="2000000030"), Stated(5000, None, None, 30)),
    (h(RateLimit_Limit="10, 10;w=1"), Stated(10, None)),
])
def test_the_forms_read(headers: CIMultiDict[str], expected: Stated) -> None:
    assert stated(headers, now=2_000_000_000) == expected


@pytest.mark.parametrize("headers", [
    h(), h(RateLimit_Policy="garbage;;=", RateLimit="r=oops"), h(RateLimit_Policy='"p";q=0'),
    h(X_RateLimit_Limit="many"), h(X_RateLimit_Limit="-5"), h(Retry_After="1"),
])
def test_what_does_not_parse_is_as_if_absent(headers: CIMultiDict[str]) -> None:
    assert stated(headers) is None


# -- the simulator's limits --------------------------------------------------------------------
def test_a_schedule_moves_the_bucket_and_a_storm_refuses_everything() -> None:
    limits = Limits(Faults(rate_schedule=((0, 100), (1, 10), (2, 0), (2.5, 100))), 0.0)
    passed = sum(limits.take(t / 1000)[0] == 0 for t in range(1000))  # 1 request a ms
    assert 190 <= passed <= 201  # the burst (one second of 100/s) and 100/s
    passed = sum(limits.take(1 + t / 1000)[0] == 0 for t in range(1000))
    assert 10 <= passed <= 21  # at most the new burst (10 tokens kept) and 10/s
    waits = [limits.take(2 + t / 1000)[0] for t in range(500)]
    assert all(w > 0 for w in waits)
    assert waits[0] == pytest.approx(0.5) and waits[-1] == pytest.approx(0.001)
    assert limits.take(2.5)[0] == 0  # over: the bucket filled meanwhile


def test_a_windowed_quota_and_its_headers() -> None:
    faults = Faults(quota=5, quota_window_s=10.0, rate_headers="ietf")
    limits = Limits(faults, 0.0)
    answers = [limits.take(t) for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)]
    assert [w for w, _ in answers] == [0, 0, 0, 0, 0, 5.0]
    assert answers[0][1] == {"RateLimit-Policy": '"default";q=5;w=10',
                             "RateLimit": '"default";r=4;t=10'}
    assert answers[-1][1]["RateLimit"] == '"default";r=0;t=5'
    assert limits.take(10.5)[0] == 0  # a new window


def test_x_headers_state_the_bucket() -> None:
    limits = Limits(Faults(rate_limit=50.0, rate_headers="x"), 0.0)
    wait, headers = limits.take(0.0)
    assert wait == 0
    assert headers == {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "49",
                       "X-RateLimit-Reset": "1"}
    assert Limits(Faults(rate_limit=50.0), 0.0).take(0.0) == (0.0, {})


# -- a run's client against a simulator that states its limit ---------------------------------
@pytest.mark.parametrize("style", ["ietf", "x"])
async def test_the_client_follows_a_stated_limit_with_no_429(
    sim_factory: SimFactory, style: str
) -> None:
    limit = 100.0
    sim = await sim_factory(SimConfig(images=40, faults=Faults(
        rate_limit=limit, rate_burst=5.0, rate_headers=style)))  # little burst to hide behind
    controller = RateController()
    images = [(i["project_id"], i["region_id"], i["id"]) for i in sim.images()]
    async with Client.open(Settings(base_url=sim.url, api_key="k"),
                           AdaptiveLimiter(controller)) as client:
        await client.get_image(*images[0])
        assert controller.rate == pytest.approx(STATED_SHARE * limit)  # at once
        started = time.monotonic()
        await asyncio.gather(*(client.get_image(*images[i % len(images)]) for i in range(150)))
        took = time.monotonic() - started
    assert sim.counters.rate_limited == 0
    assert took >= 149 / limit  # no faster than the limit

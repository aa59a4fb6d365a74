"""The pool against the simulator over loopback HTTP: one outcome per target, task locks
parked off the worker slots, the stops (401, an unreachable API, ``stop()``), a bounded feed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from worker.api import Client, Settings
from worker.errors import AuthFailed, Transient
from worker.journal import Pending
from worker.limiter import RateController
from worker.models import Changes, Image, Outcome, RunContext
from worker.pacer import AdaptiveLimiter
from worker.plan import apply_patch, plan_changes
from worker.pool import Pool, PoolSettings
from worker.retry import RetryPolicy
from worker.simulator import Faults, SimConfig, Simulator

SimFactory = Callable[[SimConfig | None], Awaitable[Simulator]]
Key = tuple[int, int, str]

CTX = RunContext(run_id="pool-test", run_date="2026-01-02")
CHANGES = Changes(set_tags={"managed-by": "bulk-tagger"}, remove_tags=("legacy",),
                  rename_tags={"team": "owner"})
FAST = RetryPolicy(budget_s=5.0, base_s=0.01, max_wait_s=0.05)


def private_keys(sim: Simulator, n: int | None = None) -> list[Key]:
    """Private images that ``CHANGES`` would change (no read-only or rename conflict)."""
    keys = [(i["project_id"], i["region_id"], i["id"]) for i in sim.images()
            if i["visibility"] == "private"
            and plan_changes(Image.from_api(i), CHANGES, CTX).patch is not None]
    return keys if n is None else keys[:n]


def state(sim: Simulator, key: Key) -> dict[str, Any]:
    return Image.from_api(sim.image(*key)).state()


def pending(sim: Simulator, keys: list[Key], changes: Changes = CHANGES) -> list[Pending]:
    """What the plan phase would journal for ``keys`` (planned against their state now), and
    hand the apply phase: those with something to send."""
    out = []
    for seq, key in enumerate(keys, 1):
        image = Image.from_api(sim.image(*key))
        plan = plan_changes(image, changes, CTX)
        if plan.patch is None:
            continue
        out.append(Pending(seq, *key, image.name, changes, image.state(), plan.patch,
                           image.task_id))
    return out


class Record:
    """The sink: every outcome with the time it came, by seq."""

    def __init__(self) -> None:
        self.outcomes: dict[int, Outcome] = {}
        self.at: dict[int, float] = {}
        self.twice: list[int] = []

    def __call__(self, seq: int, outcome: Outcome) -> None:
        if seq in self.outcomes:
            self.twice.append(seq)
        self.outcomes[seq] = outcome
        self.at[seq] = time.monotonic()

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for outcome in self.outcomes.values():
            out[outcome.status] = out.get(outcome.status, 0) + 1
        return out


@asynccontextmanager
async def client_for(sim: Simulator, rate: float | None = 5000.0) -> AsyncIterator[Client]:
    limiter = AdaptiveLimiter(RateController(rate))
    async with Client.open(Settings(base_url=sim.url, api_key="pool-key"), limiter) as client:
        yield client


def pool(client: Client, record: Record, **settings: Any) -> Pool:
    settings.setdefault("retry", FAST)
    settings.setdefault("lock_poll_s", 0.05)
    settings.setdefault("lock_poll_max_s", 0.2)
    return Pool(client, PoolSettings(**settings), CTX, record)


async def until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out waiting")


def assert_applied(sim: Simulator, items: list[Pending], record: Record) -> None:
    """Every ``updated`` target shows exactly ``apply_patch(before, patch)``."""
    for item in items:
        outcome = record.outcomes[item.seq]
        if outcome.status == "updated":
            assert outcome.before is not None and outcome.patch is not None
            key = (item.project_id, item.region_id, item.image_id)
            assert state(sim, key) == apply_patch(outcome.before, outcome.patch)


# -- the plain run --------------------------------------------------------------------------
async def test_every_target_ends_once_and_as_planned(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=400))
    images = sim.images()
    keys = [(i["project_id"], i["region_id"], i["id"]) for i in images]
    sent = pending(sim, [k for k, i in zip(keys, images, strict=True)
                         if i["visibility"] == "private"])
    planned = {(i.project_id, i.region_id, i.image_id): i for i in sent}
    expected = {k: apply_patch(planned[k].before or {}, planned[k].patch or {})
                if k in planned else state(sim, k) for k in keys}
    record = Record()
    async with client_for(sim) as client:
        await pool(client, record, concurrency=8).run(sent)
    assert len(record.outcomes) == len(sent) > 200 and not record.twice
    assert record.statuses() == {"updated": len(sent)}
    assert_applied(sim, sent, record)
    assert all(state(sim, k) == expected[k] for k in keys)
    assert sim.counters.requests["patch"] == len(sent)
    assert sim.counters.patch_bodies_with_tags_null == 0


async def test_not_found_rejected_and_a_bug_end_as_outcomes(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=100))
    keys = private_keys(sim, 6)
    public = next((i["project_id"], i["region_id"], i["id"]) for i in sim.images()
                  if i["visibility"] == "public")
    items = pending(sim, [*keys, public], Changes(set_tags={"x": "1"}))
    assert len(items) == 7
    sim.delete_image(*keys[0])
    bug = items[1]
    items[1] = Pending(bug.seq, bug.project_id, bug.region_id, bug.image_id, bug.name,
                       bug.changes, bug.before, {"tags": {"x": object()}}, None)
    record = Record()
    async with client_for(sim) as client:
        await pool(client, record, concurrency=3).run(items)
    by_seq = record.outcomes
    assert (by_seq[1].status, by_seq[1].reason, by_seq[1].http_status) == \
        ("failed", "not_found", 404)
    assert by_seq[1].attempts == 1  # a 404 is not retried
    assert (by_seq[2].status, by_seq[2].reason) == ("failed", "internal_error")
    assert (by_seq[7].status, by_seq[7].reason, by_seq[7].http_status) == \
        ("failed", "rejected", 403)
    assert "public" in (by_seq[7].error or "")
    assert [by_seq[s].status for s in range(3, 7)] == ["updated"] * 4


# -- task locks -----------------------------------------------------------------------------------
async def test_a_locked_image_never_holds_a_worker_slot(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=500, faults=Faults(latency_ms=5)))
    keys = private_keys(sim, 204)
    items = pending(sim, keys)
    # planned before the locks: the pool meets them as 409s
    lock_s = 3.0
    locked_at = time.monotonic()
    for key in keys[:4]:
        sim.lock_image(*key, lock_s)
    unlocked_at = locked_at + lock_s
    record = Record()
    async with client_for(sim) as client:
        work = pool(client, record, concurrency=4)
        await work.run(items)
    assert len(record.outcomes) == 204 and not record.twice
    assert record.statuses() == {"updated": 204}
    others = [record.at[i.seq] for i in items[4:]]
    firsts = [record.at[i.seq] for i in items[:4]]
    # the 200 others were all done while the four first ones were still locked...
    assert max(others) < unlocked_at
    # ...and those four ended after their lock did, waited for, then sent
    assert min(firsts) >= unlocked_at
    assert all(record.outcomes[i.seq].lock_wait_s >= lock_s - 0.1 for i in items[:4])
    assert sim.counters.statuses[409] == 4
    assert all(sim.counters.patches_per_image[k] == 2 for k in keys[:4])
    assert sim.counters.requests["task"] >= 4
    assert work.stats.lock_waits == 4 and work.stats.max_in_flight <= 4
    assert_applied(sim, items, record)


@pytest.mark.parametrize("end_state", ["FINISHED", "ERROR"])
async def test_after_a_lock_the_image_is_read_and_planned_again(
    sim_factory: SimFactory, end_state: str
) -> None:
    sim = await sim_factory(SimConfig(images=60))
    key = private_keys(sim, 1)[0]
    items = pending(sim, [key])
    task_id = sim.lock_image(*key, 0.4, end_state=end_state,
                             set_tags={"team": "blue", "legacy": "yes"})
    record = Record()
    async with client_for(sim) as client:
        await pool(client, record).run(items)
    outcome = record.outcomes[1]
    assert outcome.status == "updated"
    # planned against what the task left: its `team` renamed, its `legacy` removed
    assert outcome.before is not None and outcome.before["tags"]["team"] == "blue"
    assert outcome.patch is not None
    assert outcome.patch["tags"]["owner"] == "blue" and outcome.patch["tags"]["team"] is None
    final = state(sim, key)
    assert final == apply_patch(outcome.before, outcome.patch)
    assert final["tags"]["owner"] == "blue" and "team" not in final["tags"]
    assert "legacy" not in final["tags"]
    assert outcome.lock_wait_s >= 0.3
    assert sim.store.task(task_id).state == end_state


async def test_a_lock_seen_at_plan_time_is_waited_for_without_a_patch(
    sim_factory: SimFactory,
) -> None:
    sim = await sim_factory(SimConfig(images=60))
    key = private_keys(sim, 1)[0]
    sim.lock_image(*key, 0.3)
    items = pending(sim, [key])
    assert items[0].lock_task is not None
    record = Record()
    async with client_for(sim) as client:
        await pool(client, record).run(items)
    assert record.outcomes[1].status == "updated"
    assert sim.counters.statuses[409] == 0  # it never sent into the lock
    assert sim.counters.patches_per_image[key] == 1


async def test_a_lock_that_never_ends_times_out(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=60))
    keys = private_keys(sim, 3)
    items = pending(sim, keys)
    before = state(sim, keys[0])
    task_id = sim.lock_image(*keys[0], None)
    record = Record()
    started = time.monotonic()
    async with client_for(sim) as client:
        await pool(client, record, lock_timeout_s=0.6).run(items)
    assert time.monotonic() - started < 3.0
    outcome = record.outcomes[1]
    assert (outcome.status, outcome.reason) == ("failed", "lock_timeout")
    assert task_id in (outcome.error or "")
    assert outcome.lock_wait_s >= 0.6
    assert state(sim, keys[0]) == before
    assert [record.outcomes[s].status for s in (2, 3)] == ["updated", "updated"]


# -- stops ---------------------------------------------------------------------------------------
async def test_a_401_stops_the_pool_and_nothing_more_is_sent(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=300, faults=Faults(auth_fail_after=40)))
    items = pending(sim, private_keys(sim, 150))
    record = Record()
    async with client_for(sim) as client:
        with pytest.raises(AuthFailed):
            await pool(client, record, concurrency=6).run(items)
    # the 401s are what was already on the wire when the first came back: at most one per worker
    assert 1 <= sim.counters.statuses[401] <= 6
    assert sim.counters.total() <= 40 + 6
    assert len(record.outcomes) <= 40 and not record.twice
    assert all(o.status == "updated" for o in record.outcomes.values())


async def test_an_unreachable_api_stops_the_run_instead_of_failing_every_target(
    sim_factory: SimFactory,
) -> None:
    sim = await sim_factory(SimConfig(images=200, faults=Faults(p_5xx=1.0)))
    items = pending(sim, private_keys(sim, 100))
    record = Record()
    started = time.monotonic()
    async with client_for(sim) as client:
        with pytest.raises(Transient):
            await pool(client, record, concurrency=4,
                       retry=RetryPolicy(budget_s=0.5, base_s=0.01, max_wait_s=0.05)).run(items)
    assert time.monotonic() - started < 3.0
    assert record.outcomes == {}  # no target is called failed: they stay pending for --resume


async def test_stop_cuts_retry_waits_short(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=200))
    items = pending(sim, private_keys(sim, 100))
    record = Record()
    async with client_for(sim) as client:
        work = pool(client, record, concurrency=4,
                    retry=RetryPolicy(budget_s=600.0, base_s=30.0, max_wait_s=30.0))
        runner = asyncio.create_task(work.run(items))
        await until(lambda: len(record.outcomes) >= 20)
        sim.set_faults(p_429=1.0, retry_after_s=30.0)  # every worker now waits 30 s
        await until(lambda: sim.counters.rate_limited >= 4)
        await asyncio.sleep(0.05)
        stopped = time.monotonic()
        work.stop()
        await asyncio.wait_for(runner, 1.0)
    assert time.monotonic() - stopped < 0.5
    done = len(record.outcomes)
    assert 20 <= done < 100 and not record.twice
    assert all(o.status == "updated" for o in record.outcomes.values())


# -- resume, the feed ---------------------------------------------------------------------------
async def test_a_resumed_target_is_read_and_planned_again(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=60))
    keys = private_keys(sim, 4)
    items = pending(sim, keys)
    assert all(i.patch is not None for i in items)
    store = sim.store
    # 1: the last process's PATCH landed, its outcome was never committed
    store.patch(store.index(*keys[0]), items[0].patch)
    # 2: someone else set one of the tags the plan sets, to another value, since the plan
    store.patch(store.index(*keys[1]), {"tags": {"managed-by": "someone-else"}})
    # 3: untouched; 4: an undo target whose image no longer shows what the run had set
    last = items[3]
    items[3] = Pending(last.seq, last.project_id, last.region_id, last.image_id, last.name,
                       last.changes, last.before, last.patch, None,
                       expect={"tags": {"managed-by": "the-run"}})
    record = Record()
    async with client_for(sim) as client:
        await pool(client, record).run(items, reread=True)
    first, second, third, fourth = (record.outcomes[i.seq] for i in items)
    # the landed PATCH is recorded as the run's own change, against the state it was sent to
    assert (first.status, first.reason) == ("updated", "verified_by_read")
    assert (first.before, first.patch) == (items[0].before, items[0].patch)
    assert first.after == state(sim, keys[0]) == apply_patch(first.before, first.patch)
    # the changed one is planned again against what it is now, and sent
    assert second.status == "updated" and second.before is not None
    assert second.before["tags"]["managed-by"] == "someone-else"
    assert state(sim, keys[1])["tags"]["managed-by"] == "bulk-tagger"
    assert third.status == "updated"
    assert (fourth.status, fourth.reason) == ("skipped", "conflict")
    assert sim.counters.requests["get"] == 4 and sim.counters.requests["patch"] == 2
    assert sim.counters.patches_per_image[keys[3]] == 0


class _LockAfterLostAnswer(Simulator):
    """Applies the first PATCH, drops its answer and locks the image for a moment: the retry
    meets a 409; when the lock ends the image shows the change, made by that first PATCH."""

    async def patch_image(self, request: web.Request) -> web.StreamResponse:
        response = await super().patch_image(request)
        if self.faults.p_drop_after:
            self.set_faults(p_drop_after=0.0)
            info = request.match_info
            self.lock_image(int(info["project_id"]), int(info["region_id"]),
                            info["image_id"], 0.2)
        return response


async def test_a_lost_answer_then_a_lock_is_recorded_as_the_runs_change() -> None:
    sim = _LockAfterLostAnswer(SimConfig(images=60, faults=Faults(
        p_drop_after=1.0, methods=frozenset({"PATCH"}))))
    await sim.start()
    try:
        keys = private_keys(sim, 1)
        items = pending(sim, keys)
        record = Record()
        async with client_for(sim) as client:
            await pool(client, record).run(items)
    finally:
        await sim.stop()
    (outcome,) = record.outcomes.values()
    assert (outcome.status, outcome.reason) == ("updated", "verified_by_read")
    assert (outcome.before, outcome.patch) == (items[0].before, items[0].patch)
    assert sim.counters.applied_per_image[keys[0]] == 1
    assert sim.counters.statuses[409] == 1 and outcome.lock_wait_s > 0


async def test_retries_run_out_on_a_patch_that_landed(sim_factory: SimFactory) -> None:
    # every PATCH answer is lost after the write; reads answer, so the API is not "down"
    sim = await sim_factory(SimConfig(images=60, faults=Faults(
        p_drop_after=1.0, methods=frozenset({"PATCH"}))))
    items = pending(sim, private_keys(sim, 3))
    record = Record()
    async with client_for(sim) as client:
        client.last_ok = time.monotonic() + 3600  # as if other requests kept succeeding
        await pool(client, record, retry=RetryPolicy(budget_s=0.3, base_s=0.01,
                                                      max_wait_s=0.05)).run(items)
    for item in items:
        outcome = record.outcomes[item.seq]
        assert (outcome.status, outcome.reason) == ("updated", "verified_by_read")
        assert outcome.patch == item.patch and outcome.attempts >= 3
    assert_applied(sim, items, record)


async def test_the_feed_is_bounded(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=1000))
    items = pending(sim, private_keys(sim, 600))
    taken = 0
    taken_at_first_outcome: list[int] = []

    def stream() -> Iterator[Pending]:
        nonlocal taken
        for item in items:
            taken += 1
            yield item

    record = Record()

    def sink(seq: int, outcome: Outcome) -> None:
        if not record.outcomes:
            taken_at_first_outcome.append(taken)
        record(seq, outcome)

    async with client_for(sim) as client:
        await Pool(client, PoolSettings(concurrency=8, retry=FAST), CTX, sink).run(stream())
    # queue of 2 x concurrency, one item in each worker's hands, one waiting to be put
    assert taken_at_first_outcome[0] <= 8 * 2 + 8 + 1
    assert len(record.outcomes) == 600 and not record.twice


async def test_stop_cuts_waits_for_a_rate_limiter_slot(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(images=100))
    items = pending(sim, private_keys(sim, 30))
    record = Record()
    async with client_for(sim, rate=4.0) as client:  # one slot every quarter second
        work = pool(client, record, concurrency=6)
        runner = asyncio.create_task(work.run(items))
        await until(lambda: len(record.outcomes) >= 2)
        stopped = time.monotonic()
        work.stop()  # five workers hold a target and wait for a slot: they must not send
        await asyncio.wait_for(runner, 1.0)
    assert time.monotonic() - stopped < 0.2
    sent = sim.counters.requests["patch"]
    assert sent == len(record.outcomes) <= 4

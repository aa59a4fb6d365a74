"""The API client over real loopback HTTP: every row of the status table, against the simulator
where it can answer that way, and against a small scripted aiohttp server where it cannot
(a 403 on a read, 408, a redirect, a 409 naming its task only in the message, odd bodies)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import NoLimiter
from worker import spec
from worker.api import (
    Client,
    NoAnswer,
    Settings,
    check_base_url,
    classify,
    retry_after_seconds,
)
from worker.errors import (
    AuthFailed,
    JobError,
    Locked,
    NotFound,
    RateLimited,
    Rejected,
    Transient,
)
from worker.limiter import CEILING_SHARE, RateController
from worker.pacer import AdaptiveLimiter
from worker.retry import RetryPolicy
from worker.selectors import Expander
from worker.simulator import Faults, SimConfig, Simulator

SimFactory = Callable[[SimConfig | None], Awaitable[Simulator]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEY = "api-test-key-5f1e2d"
PATH = "/cloud/v1/images/1337/7/img-1"


def private_image(sim: Simulator) -> tuple[int, int, str]:
    for image in sim.images():
        if image["visibility"] == "private" and not image.get("task_id"):
            return image["project_id"], image["region_id"], image["id"]
    raise AssertionError("the demo data has no private image")


def public_image(sim: Simulator) -> tuple[int, int, str]:
    for image in sim.images():
        if image["visibility"] == "public":
            return image["project_id"], image["region_id"], image["id"]
    raise AssertionError("the demo data has no public image")


class Scripted:
    """A loopback server answering each path with a handler the test sets; counts hits."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: dict[str, int] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        handler = self.routes.get(request.path)
        if handler is None:
            return web.json_response({"message": "no route"}, status=404)
        return await handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def answer(status: int, body: Any = None, *, text: str | None = None,
           content_type: str = "application/json", headers: dict[str, str] | None = None,
           delay: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        if text is not None:
            return web.Response(status=status, text=text, content_type=content_type,
                                headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return handler


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    await server.start()
    yield server
    await server.stop()


async def open_client(url: str, **settings: Any) -> Any:
    return Client.open(Settings(base_url=url, api_key=KEY, **settings), NoLimiter())


# -- 2xx, 401, 403, 404 against the simulator ----------------------------------------------
async def test_get_and_patch_round_trip(sim: Simulator) -> None:
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        image = await client.get_image(p, r, image_id)
        assert (image.project_id, image.region_id, image.id) == (p, r, image_id)
        patched = await client.patch_image(p, r, image_id, {"tags": {"owner": "alice"}})
    assert patched.tags["owner"] == "alice"
    assert {t["key"]: t["value"] for t in sim.image(p, r, image_id)["tags"]}["owner"] == "alice"
    assert client.counts.by_kind["get"] == 1 and client.counts.by_kind["patch"] == 1
    assert client.last_ok is not None


async def test_401_on_read_and_write_is_auth_failed_and_nothing_more_is_sent(
    sim_factory: SimFactory,
) -> None:
    sim = await sim_factory(SimConfig(api_key="the-right-key"))
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        with pytest.raises(AuthFailed) as read:
            await client.get_image(p, r, image_id)
        assert read.value.status == 401
        sent = sim.counters.total()
        with pytest.raises(AuthFailed):
            await client.patch_image(p, r, image_id, {"tags": {"a": "b"}})
        with pytest.raises(AuthFailed):
            await client.get_task("00000000-0000-4000-8000-000000000000")
    assert sim.counters.total() == sent == 1  # the latch: the later calls never left
    assert KEY not in str(read.value)


async def test_401_on_write(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(api_key="the-right-key"))
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        with pytest.raises(AuthFailed) as write:
            await client.patch_image(p, r, image_id, {"tags": {"a": "b"}})
    assert write.value.status == 401


async def test_403_on_write_is_rejected_with_the_api_message(sim: Simulator) -> None:
    p, r, image_id = public_image(sim)
    async with await open_client(sim.url) as client:
        with pytest.raises(Rejected) as exc:
            await client.patch_image(p, r, image_id, {"tags": {"a": "b"}})
        assert client.refused is None  # a refused write stops nothing
        await client.get_image(p, r, image_id)
    assert exc.value.status == 403
    assert "public" in exc.value.message


async def test_403_on_read_is_auth_failed(scripted: Scripted) -> None:
    scripted.routes[PATH] = answer(403, {"message": "You do not have permission"})
    async with await open_client(scripted.url) as client:
        with pytest.raises(AuthFailed) as exc:
            await client.get_image(1337, 7, "img-1")
    assert exc.value.status == 403 and exc.value.message == "You do not have permission"


async def test_404_is_not_found(sim: Simulator) -> None:
    async with await open_client(sim.url) as client:
        with pytest.raises(NotFound) as get:
            await client.get_image(1337, 7, "no-such-image")
        with pytest.raises(NotFound):
            await client.patch_image(1337, 7, "no-such-image", {"tags": {"a": "b"}})
    assert get.value.status == 404 and "not found" in get.value.message.lower()


async def test_400_and_422_are_rejected_with_the_message_kept(
    sim: Simulator, scripted: Scripted
) -> None:
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        with pytest.raises(Rejected) as bad:
            await client.patch_image(p, r, image_id, {"ssh_key": "maybe"})
    assert bad.value.status == 400 and "ssh_key" in bad.value.message
    scripted.routes[PATH] = answer(422, {"detail": "Unprocessable: name too long"})
    async with await open_client(scripted.url) as client:
        with pytest.raises(Rejected) as unprocessable:
            await client.patch_image(1337, 7, "img-1", {"name": "x"})
    assert unprocessable.value.status == 422
    assert unprocessable.value.message == "Unprocessable: name too long"


# -- 409 --------------------------------------------------------------------------------------
async def test_409_carries_the_task_id_from_the_body(sim: Simulator) -> None:
    p, r, image_id = private_image(sim)
    task_id = sim.lock_image(p, r, image_id, None)
    async with await open_client(sim.url) as client:
        with pytest.raises(Locked) as exc:
            await client.patch_image(p, r, image_id, {"tags": {"a": "b"}})
        task = await client.get_task(task_id)
    assert exc.value.status == 409 and exc.value.task_id == task_id
    assert task["state"] == "RUNNING"


async def test_409_with_the_task_only_in_the_message(scripted: Scripted) -> None:
    task = "0b6f4a4e-2a63-4c55-9d3c-2f8f6f0b9e11"
    scripted.routes[PATH] = answer(409, {"message": f"Image is locked by task {task}"})
    async with await open_client(scripted.url) as client:
        with pytest.raises(Locked) as exc:
            await client.patch_image(1337, 7, "img-1", {"tags": {"a": "b"}})
    assert exc.value.task_id == task


async def test_409_without_any_task(scripted: Scripted) -> None:
    scripted.routes[PATH] = answer(409, text="conflict", content_type="text/plain")
    async with await open_client(scripted.url) as client:
        with pytest.raises(Locked) as exc:
            await client.patch_image(1337, 7, "img-1", {"tags": {"a": "b"}})
    assert exc.value.task_id is None and exc.value.message == "HTTP 409: conflict"


# -- 429 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("form", "low", "high"),
    [("seconds", 3.0, 3.0), ("ms", 2.5, 2.5), ("date", 1.0, 3.5)],
)
async def test_429_retry_after_forms(
    sim_factory: SimFactory, form: str, low: float, high: float
) -> None:
    sim = await sim_factory(
        SimConfig(faults=Faults(p_429=1.0, retry_after=form, retry_after_s=2.5))
    )
    controller = RateController(100.0)
    async with Client.open(Settings(base_url=sim.url, api_key=KEY),
                           AdaptiveLimiter(controller)) as client:
        with pytest.raises(RateLimited) as exc:
            await client.get_image(1337, 7, "whatever")
    assert exc.value.status == 429
    assert exc.value.retry_after is not None and low <= exc.value.retry_after <= high
    assert client.counts.rate_limited == 1 and controller.throttled == 1


async def test_429_from_the_servers_token_bucket_prefers_retry_after_ms(
    sim_factory: SimFactory,
) -> None:
    sim = await sim_factory(SimConfig(faults=Faults(rate_limit=5.0, rate_burst=1.0)))
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        await client.get_image(p, r, image_id)
        with pytest.raises(RateLimited) as exc:
            await client.get_image(p, r, image_id)
    # the bucket refills one token in 0.2 s: Retry-After says 1 s, retry-after-ms the truth
    assert exc.value.retry_after is not None and 0.05 < exc.value.retry_after <= 0.2


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"Retry-After": "7"}) == 7.0
    assert retry_after_seconds({"Retry-After": "1.5"}) == 1.5
    assert retry_after_seconds({"Retry-After": "-3"}) == 0.0
    assert retry_after_seconds({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "soon", "Retry-After": "9"}) == 9.0
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after_seconds({"Retry-After": past}) == 0.0
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= (retry_after_seconds({"Retry-After": future}) or 0) <= 30.0
    assert retry_after_seconds({"Retry-After": "tomorrow-ish"}) is None
    assert retry_after_seconds({}) is None


# -- transient: 408, 5xx, drops, timeouts, bad JSON ---------------------------------------------
async def test_408_is_transient(scripted: Scripted) -> None:
    scripted.routes[PATH] = answer(408, text="Request Timeout", content_type="text/plain")
    async with await open_client(scripted.url) as client:
        with pytest.raises(Transient) as exc:
            await client.get_image(1337, 7, "img-1")
    assert exc.value.status == 408 and exc.value.retryable
    assert client.counts.transient == 1


async def test_5xx_with_an_html_body_is_transient(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(faults=Faults(p_5xx=1.0)))
    async with await open_client(sim.url) as client:
        with pytest.raises(Transient) as exc:
            await client.get_image(1337, 7, "whatever")
    assert exc.value.status in (500, 502, 503)
    assert exc.value.message == f"HTTP {exc.value.status} with a text/html body"
    assert "<html>" not in exc.value.message


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_dropped_connection_is_transient(sim_factory: SimFactory, when: str) -> None:
    faults = Faults(p_drop_before=1.0) if when == "before" else Faults(p_drop_after=1.0)
    sim = await sim_factory(SimConfig(faults=faults))
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        with pytest.raises(Transient) as exc:
            await client.patch_image(p, r, image_id, {"tags": {"dropped": when}})
    assert exc.value.status is None and exc.value.retryable
    tags = {t["key"]: t["value"] for t in sim.image(p, r, image_id)["tags"]}
    # dropped before the write: nothing changed; after it: the write stands
    assert tags.get("dropped") == (None if when == "before" else "after")
    assert sim.counters.faults[f"drop_{when}"] == 1


async def test_a_slow_answer_times_out_on_sock_read(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(faults=Faults(latency_ms=2000)))
    started = time.monotonic()
    async with await open_client(sim.url, read_timeout_s=0.2) as client:
        with pytest.raises(Transient) as exc:
            await client.get_image(1337, 7, "whatever")
    assert time.monotonic() - started < 1.5
    assert exc.value.status is None and "did not answer in time" in exc.value.message
    assert isinstance(exc.value, NoAnswer) and exc.value.cause == "timeout"


async def test_a_dripping_answer_ends_at_the_total_deadline_kept_by_one_timer(
    scripted: Scripted,
) -> None:
    # a deadline of 5 s or more is kept by the client's one timer (aiohttp would round it to
    # a second anyway); a byte every 0.1 s never trips the read timeout
    async def drip(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(200):
            await asyncio.sleep(0.1)
            await resp.write(b" ")
        return resp

    scripted.routes[PATH] = drip
    scripted.routes["/cloud/v1/images/1337/7/img-2"] = answer(200, {"id": "img-2"})
    async with await open_client(scripted.url, request_timeout_s=5.0) as client:
        started = time.monotonic()
        with pytest.raises(NoAnswer) as exc:
            await client.get_image(1337, 7, "img-1")
        took = time.monotonic() - started
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the deadline's cancel taken back
        assert (await client.get_image(1337, 7, "img-2")).id == "img-2"  # the client goes on
        # a caller's own cancel of a request in flight stays a cancel
        inflight = asyncio.ensure_future(client.get_image(1337, 7, "img-1"))
        await asyncio.sleep(0.3)
        inflight.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inflight
    assert 5.0 <= took < 6.5, took
    assert exc.value.cause == "timeout" and client.counts.transient == 1


async def test_a_2xx_that_is_not_json_is_transient(scripted: Scripted) -> None:
    scripted.routes[PATH] = answer(200, text="<html>maintenance</html>", content_type="text/html")
    async with await open_client(scripted.url) as client:
        with pytest.raises(Transient) as exc:
            await client.get_image(1337, 7, "img-1")
    assert exc.value.status == 200


async def test_an_unreachable_server_is_transient() -> None:
    async with await open_client("http://127.0.0.1:9", connect_timeout_s=1.0) as client:
        with pytest.raises(Transient) as exc:
            await client.get_image(1337, 7, "img-1")
    assert exc.value.status is None
    assert "connection refused by 127.0.0.1:9" in exc.value.message
    assert client.last_ok is None


# -- redirects, the rest of the table ---------------------------------------------------------
async def test_a_redirect_is_not_followed(scripted: Scripted) -> None:
    elsewhere = "/cloud/v1/images/1337/7/elsewhere"
    scripted.routes[PATH] = answer(302, text="", content_type="text/plain",
                                   headers={"Location": scripted.url + elsewhere})
    scripted.routes[elsewhere] = answer(200, {"id": "elsewhere", "name": "x", "tags": []})
    async with await open_client(scripted.url) as client:
        with pytest.raises(Rejected) as exc:
            await client.patch_image(1337, 7, "img-1", {"tags": {"a": "b"}})
    assert exc.value.status == 302 and "redirect" in exc.value.message
    assert scripted.hits.get(elsewhere) is None


@pytest.mark.parametrize(
    ("status", "write", "kind"),
    [
        (401, False, AuthFailed), (401, True, AuthFailed), (403, False, AuthFailed),
        (403, True, Rejected), (404, True, NotFound), (409, True, Locked),
        (429, False, RateLimited), (408, True, Transient), (500, False, Transient),
        (502, True, Transient), (503, True, Transient), (504, False, Transient),
        (400, True, Rejected), (415, True, Rejected), (422, True, Rejected),
        (301, True, Rejected), (307, False, Rejected), (418, False, Rejected),
    ],
)  # fmt: skip
def test_the_classification_table(status: int, write: bool, kind: type[Exception]) -> None:
    error = classify(status, b'{"message": "m"}', {"Content-Type": "application/json"},
                     write=write)
    assert type(error) is kind
    assert error.status == status
    assert error.retryable == (kind in (RateLimited, Transient))


# -- the limiter hears every answer -----------------------------------------------------------
async def test_every_answer_reaches_the_limiter(sim_factory: SimFactory) -> None:
    sim = await sim_factory(SimConfig(faults=Faults(rate_limit=20.0, rate_burst=3.0)))
    controller = RateController(1000.0, noise_count=1)
    async with Client.open(Settings(base_url=sim.url, api_key=KEY),
                           AdaptiveLimiter(controller)) as client:
        outcomes = await asyncio.gather(
            *(client.get_image(1337, 7, "missing") for _ in range(8)), return_exceptions=True
        )
    throttled = sum(isinstance(o, RateLimited) for o in outcomes)
    missing = sum(isinstance(o, NotFound) for o in outcomes)
    assert throttled + missing == 8 and throttled >= 1 and missing >= 3
    assert controller.throttled == throttled
    assert controller.accepted_last_second() == missing  # a 404 is an answer too
    assert controller.decreases == 1 and controller.rate < 1000.0 * CEILING_SHARE


async def test_latency_is_observed_for_each_answer(sim: Simulator) -> None:
    seen: list[float] = []
    async with await open_client(sim.url) as client:
        client.observe_latency = seen.append
        await client.list_projects()
        await client.list_regions()
        with pytest.raises(NotFound):
            await client.get_image(1337, 7, "missing")
    assert len(seen) == 3 and all(ms >= 0 for ms in seen)


# -- reads, pages, and what the client refuses to send -----------------------------------------
async def test_the_list_is_walked_page_by_page(sim_factory: SimFactory, tmp_path: Any) -> None:
    """The selectors' paging (the one loop over limit/offset, pages read ahead) over the
    client: every image of the region once, in order, in pages of at most ``limit``."""
    sim = await sim_factory(SimConfig(images=300, page_max=7))
    expected = [i["id"] for i in sim.images() if (i["project_id"], i["region_id"]) == (1337, 7)]
    pages, lists = await region_pages(sim.url, tmp_path, page_size=7)
    assert [image.id for page in pages for image in page] == expected
    assert all(len(page) <= 7 for page in pages)
    assert lists == len(pages)


async def region_pages(url: str, tmp_path: Any, *, page_size: int) -> tuple[list[Any], int]:
    """The pages the selectors read of region 1337/7 at ``url``, and the list GETs sent."""
    job = tmp_path / "job.yaml"
    job.write_text("name: pages\ntargets:\n  - query: {projects: [1337], regions: [7]}\n"
                   f"changes:\n  set_tags: {{a: b}}\noptions:\n  page_size: {page_size}\n")
    async with await open_client(url) as client:
        expander = Expander(spec.load_job(job, env={}), client,
                            stage_path=tmp_path / "stage.sqlite", policy=RetryPolicy())
        pages = [page async for _, _, page in expander._pages([(1337, 7, 0)], [])]
    return pages, client.counts.by_kind["list"]


@pytest.mark.parametrize("with_count", [True, False])
async def test_paging_tolerates_a_server_that_pages_by_less_or_sends_no_count(
    with_count: bool, tmp_path: Any, sim_factory: SimFactory, scripted: Scripted
) -> None:
    """A list that caps ``limit`` at 7 when the job asks 50 (with ``count``: the first page's
    length becomes the step), or sends no ``count`` (one page at a time until a short one):
    every image of the region once, in order, each offset asked once."""
    sim = await sim_factory(SimConfig(images=400))
    region = [i for i in sim.images() if (i["project_id"], i["region_id"]) == (1337, 7)]
    cap = 7 if with_count else 50
    asked: list[int] = []

    async def images(request: web.Request) -> web.StreamResponse:
        offset, limit = int(request.query["offset"]), int(request.query["limit"])
        asked.append(offset)
        body: dict[str, Any] = {"results": region[offset:offset + min(limit, cap)]}
        if with_count:
            body["count"] = len(region)
        return web.json_response(body)

    scripted.routes["/cloud/v1/images/1337/7"] = images
    pages, _ = await region_pages(scripted.url, tmp_path, page_size=50)
    ids = [image.id for page in pages for image in page]
    assert len(region) > 50 and ids == [i["id"] for i in region]
    assert sorted(asked) == list(range(0, len(region) + (0 if with_count else 1), cap))

async def test_tags_null_is_never_sent(sim: Simulator) -> None:
    p, r, image_id = private_image(sim)
    async with await open_client(sim.url) as client:
        with pytest.raises(ValueError, match="tags"):
            await client.patch_image(p, r, image_id, {"tags": None})
    assert sim.counters.requests["patch"] == 0


def test_base_url_checks() -> None:
    assert check_base_url("https://api.gcore.com/") == "https://api.gcore.com"
    assert check_base_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert check_base_url("http://localhost:1") == "http://localhost:1"
    with pytest.raises(JobError, match="unencrypted"):
        check_base_url("http://api.gcore.com")
    assert check_base_url("http://api.example", allow_insecure_http=True) == "http://api.example"
    with pytest.raises(JobError, match="not an http"):
        check_base_url("ftp://api.gcore.com")

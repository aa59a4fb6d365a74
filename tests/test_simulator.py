"""The simulator over loopback HTTP: endpoints, filters, validation, locks, faults, counters."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from worker.simulator import Faults, SimConfig, Simulator, SimulatorThread

SimFactory = Callable[[SimConfig | None], Awaitable[Simulator]]

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"APIKey {KEY}"}
PLACES = [(p, r) for p in (1337, 1338, 2001) for r in (7, 76, 38)]
REQUIRED = {
    "created_at": str, "disk_format": str, "id": str, "min_disk": int, "min_ram": int,
    "name": str, "os_distro": str, "os_type": str, "os_version": str, "project_id": int,
    "region": str, "region_id": int, "size": int, "status": str, "tags": list,
    "updated_at": str, "visibility": str,
}  # fmt: skip
OPTIONAL = (
    "architecture", "creator_task_id", "description", "display_order", "gpu_driver",
    "hw_firmware_type", "hw_machine_type", "is_baremetal", "ssh_key", "task_id",
)  # fmt: skip


class Answer:
    def __init__(self, status: int, headers: Any, text: str) -> None:
        self.status = status
        self.headers = headers
        self.text = text

    @property
    def json(self) -> Any:
        return json.loads(self.text)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    async with http.request(method, url, **kwargs) as resp:
        return Answer(resp.status, resp.headers, await resp.text())


async def list_all(http: aiohttp.ClientSession, sim: Simulator, p: int, r: int, **q: Any) -> Any:
    answer = await call(http, "GET", f"{sim.url}/cloud/v1/images/{p}/{r}", params=q)
    assert answer.status == 200, answer.text
    return answer.json


async def every_image(http: aiohttp.ClientSession, sim: Simulator) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p, r in PLACES:
        out.extend((await list_all(http, sim, p, r))["results"])
    return out


def tags_of(image: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in image["tags"]}


def read_only_of(image: dict[str, Any]) -> set[str]:
    return {t["key"] for t in image["tags"] if t["read_only"]}


def image_url(sim: Simulator, image: dict[str, Any]) -> str:
    return f"{sim.url}/cloud/v1/images/{image['project_id']}/{image['region_id']}/{image['id']}"


def first(images: list[dict[str, Any]], pred: Any) -> dict[str, Any]:
    for image in images:
        if pred(image):
            return image
    raise AssertionError("the demo data has no such image")


def writable(image: dict[str, Any]) -> bool:
    return image["visibility"] != "public"


# -- projects, regions, images ---------------------------------------------------------------
async def test_projects_and_regions(sim: Simulator, http: aiohttp.ClientSession) -> None:
    projects = (await call(http, "GET", f"{sim.url}/cloud/v1/projects")).json
    assert projects["count"] == 3
    assert {(p["id"], p["name"]) for p in projects["results"]} == {
        (1337, "demo"), (1338, "staging"), (2001, "ml"),
    }  # fmt: skip
    regions = (await call(http, "GET", f"{sim.url}/cloud/v1/regions")).json
    assert regions["count"] == 3
    assert {(r["id"], r["display_name"]) for r in regions["results"]} == {
        (7, "Luxembourg 1"), (76, "Frankfurt"), (38, "Amsterdam"),
    }  # fmt: skip
    page = (await call(http, "GET", f"{sim.url}/cloud/v1/regions?limit=1&offset=2")).json
    assert page["count"] == 3
    assert [r["id"] for r in page["results"]] == [38]


async def test_images_have_the_reference_shape(sim: Simulator, http: aiohttp.ClientSession) -> None:
    images = await every_image(http, sim)
    assert len(images) == 60
    assert len({i["id"] for i in images}) == 60
    for image in images:
        for name, kind in REQUIRED.items():
            assert isinstance(image[name], kind), (name, image)
        for name in OPTIONAL:
            assert name in image
        assert image["tags"] == image["tags_v2"]
        for tag in image["tags"]:
            assert set(tag) == {"key", "value", "read_only"}
        assert image["os_type"] in ("linux", "windows")
        assert image["visibility"] in ("private", "shared", "public")
        assert image["architecture"] in ("x86_64", "aarch64")
        assert image["created_at"].endswith("Z") and image["updated_at"] >= image["created_at"]


async def test_demo_data_exercises_the_demo_job(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    images = await every_image(http, sim)
    for p, r in PLACES:
        assert any(i["project_id"] == p and i["region_id"] == r for i in images), (p, r)
    private = [i for i in images if i["visibility"] == "private"]
    assert len(private) > len(images) * 0.7
    assert any(i["visibility"] == "public" for i in images)
    assert any(i["visibility"] == "shared" for i in images)
    assert any({"team", "owner"} <= tags_of(i).keys() for i in private)
    assert any("team" in tags_of(i) and "owner" not in tags_of(i) for i in private)
    assert any("legacy" in tags_of(i) for i in private)
    assert any(read_only_of(i) for i in private)
    assert {"gcore-source", "billing-class"} <= {k for i in images for k in read_only_of(i)}
    assert len({i["os_distro"] for i in images}) >= 4
    assert any(i["os_type"] == "windows" for i in images)
    assert any(i["name"].startswith("ubuntu-22.04") for i in images)


async def test_demo_data_is_deterministic(sim_factory: SimFactory) -> None:
    a = await sim_factory(SimConfig(images=30, seed=5))
    b = await sim_factory(SimConfig(images=30, seed=5))
    c = await sim_factory(SimConfig(images=30, seed=6))
    assert a.images() == b.images()
    assert {i["id"] for i in a.images()}.isdisjoint({i["id"] for i in c.images()})


@pytest.mark.timing
async def test_a_million_images_start_fast(sim_factory: SimFactory) -> None:
    began = time.perf_counter()
    big = await sim_factory(SimConfig(images=1_000_000))
    started = time.perf_counter() - began
    async with aiohttp.ClientSession(headers=AUTH) as http:
        page = await list_all(http, big, 1338, 76, limit=1000, offset=50_000)
        assert page["count"] == 100_000
        assert len(page["results"]) == 1000
        last = page["results"][-1]
        got = await call(http, "GET", image_url(big, last))
        assert got.json == last
    assert started < 3.0


async def test_list_order_pagination_and_count(sim: Simulator, http: aiohttp.ClientSession) -> None:
    whole = await list_all(http, sim, 1337, 7)
    assert whole["count"] == len(whole["results"]) > 10
    order = [(i["created_at"], i["id"]) for i in whole["results"]]
    assert order == sorted(order)
    seen: list[str] = []
    for offset in range(0, whole["count"] + 7, 7):
        page = await list_all(http, sim, 1337, 7, limit=7, offset=offset)
        assert page["count"] == whole["count"]
        seen.extend(i["id"] for i in page["results"])
    assert seen == [i["id"] for i in whole["results"]]


async def test_page_max_is_the_default_and_the_ceiling(sim_factory: SimFactory) -> None:
    small = await sim_factory(SimConfig(images=100, page_max=10))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        page = await list_all(http, small, 1337, 7)
        assert page["count"] == 30 and len(page["results"]) == 10
        too_big = await call(http, "GET", f"{small.url}/cloud/v1/images/1337/7?limit=11")
        assert too_big.status == 400


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=-1", "limit=abc", "offset=-1", "offset=1.5", "visibility=secret",
     "architecture=i386", "tag_key_value=notjson", 'tag_key_value=["a"]',
     'tag_key_value={"a":1}'],
)  # fmt: skip
async def test_bad_query_values_are_400(
    sim: Simulator, http: aiohttp.ClientSession, query: str
) -> None:
    answer = await call(http, "GET", f"{sim.url}/cloud/v1/images/1337/7?{query}")
    assert answer.status == 400
    assert answer.json["message"] and answer.json["exception_class"]


async def test_filters(sim_factory: SimFactory) -> None:
    big = await sim_factory(SimConfig(images=600, seed=3))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        every = (await list_all(http, big, 1337, 7))["results"]

        async def ids(**q: Any) -> list[str]:
            page = await list_all(http, big, 1337, 7, **q)
            assert page["count"] == len(page["results"])
            return [i["id"] for i in page["results"]]

        def expect(pred: Any) -> list[str]:
            found = [i["id"] for i in every if pred(i)]
            assert found, "the filter should match something"
            return found

        assert await ids(name="UBUNTU") == expect(lambda i: "ubuntu" in i["name"].lower())
        assert await ids(os_distro="Debian") == expect(lambda i: i["os_distro"] == "debian")
        assert await ids(os_version="22.04") == expect(lambda i: i["os_version"] == "22.04")
        for vis in ("private", "public", "shared"):
            assert await ids(visibility=vis) == expect(lambda i, v=vis: i["visibility"] == v)
        assert await ids(private="1") == expect(lambda i: i["visibility"] == "private")
        assert await ids(architecture="aarch64") == expect(lambda i: i["architecture"] == "aarch64")
        assert await ids(tag_key="legacy") == expect(lambda i: "legacy" in tags_of(i))
        assert await ids(tag_key=["team", "owner"]) == expect(
            lambda i: {"team", "owner"} <= tags_of(i).keys()
        )
        assert await ids(tag_key_value='{"env": "prod"}') == expect(
            lambda i: tags_of(i).get("env") == "prod"
        )
        assert await ids(tag_key_value='{"env": "prod", "team": "web"}') == expect(
            lambda i: tags_of(i).get("env") == "prod" and tags_of(i).get("team") == "web"
        )
        assert await ids(visibility="private", os_distro="ubuntu", tag_key="env") == expect(
            lambda i: (
                i["visibility"] == "private" and i["os_distro"] == "ubuntu" and "env" in tags_of(i)
            )
        )
        assert await ids(include_prices="true") == [i["id"] for i in every]
        assert await ids(name="no-such-image") == []


async def test_filters_follow_changes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    every = (await list_all(http, sim, 1337, 7))["results"]
    target = first(every, lambda i: writable(i) and "legacy" not in tags_of(i))
    before = (await list_all(http, sim, 1337, 7, tag_key="legacy"))["count"]
    answer = await call(http, "PATCH", image_url(sim, target), json={"tags": {"legacy": "x"}})
    assert answer.status == 200
    after = await list_all(http, sim, 1337, 7, tag_key="legacy")
    assert after["count"] == before + 1
    assert target["id"] in [i["id"] for i in after["results"]]
    renamed = await call(http, "PATCH", image_url(sim, target), json={"name": "Zebra-Image"})
    assert renamed.status == 200
    assert [i["id"] for i in (await list_all(http, sim, 1337, 7, name="zebra"))["results"]] == [
        target["id"]
    ]


@pytest.mark.parametrize(
    "path",
    ["/cloud/v1/images/9999/7", "/cloud/v1/images/1337/9999", "/cloud/v1/images/abc/7",
     "/cloud/v1/images/1337/7/00000000-0000-4000-8000-000000000000", "/cloud/v1/tasks/nope",
     "/cloud/v1/nothing"],
)  # fmt: skip
async def test_unknown_things_are_404_json(
    sim: Simulator, http: aiohttp.ClientSession, path: str
) -> None:
    answer = await call(http, "GET", sim.url + path)
    assert answer.status == 404
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json["message"]


async def test_image_in_another_place_is_404(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = (await list_all(http, sim, 1337, 7))["results"][0]
    answer = await call(http, "GET", f"{sim.url}/cloud/v1/images/1337/76/{image['id']}")
    assert answer.status == 404


async def test_get_image_matches_the_list(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for image in (await list_all(http, sim, 1338, 76))["results"]:
        got = await call(http, "GET", image_url(sim, image))
        assert got.status == 200
        assert got.json == image


# -- PATCH ------------------------------------------------------------------------------------
async def test_patch_sets_fields_and_merges_tags(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    every = await every_image(http, sim)
    image = first(every, lambda i: writable(i) and {"team", "env"} <= tags_of(i).keys())
    old_tags = tags_of(image)
    body = {
        "name": "renamed-image",
        "ssh_key": "required",
        "os_type": "windows",
        "hw_firmware_type": "uefi",
        "hw_machine_type": "pc",
        "is_baremetal": True,
        "tags": {"owner": "zoe", "env": "prod", "team": None, "never-there": None},
    }
    answer = await call(http, "PATCH", image_url(sim, image), json=body)
    assert answer.status == 200, answer.text
    updated = answer.json
    for name in ("name", "ssh_key", "os_type", "hw_firmware_type", "hw_machine_type"):
        assert updated[name] == body[name]
    assert updated["is_baremetal"] is True
    expected = {k: v for k, v in old_tags.items() if k != "team"}
    expected.update(owner="zoe", env="prod")
    assert tags_of(updated) == expected
    assert updated["updated_at"] > image["updated_at"]
    assert updated["created_at"] == image["created_at"]
    assert updated["tags_v2"] == updated["tags"]
    assert (await call(http, "GET", image_url(sim, image))).json == updated
    assert sim.image(image["project_id"], image["region_id"], image["id"]) == updated
    key = (image["project_id"], image["region_id"], image["id"])
    assert sim.counters.applied_per_image[key] == 1


@pytest.mark.parametrize("machine", ["pc", "q35", "i440"])
async def test_machine_types_of_page_and_sdk(
    sim: Simulator, http: aiohttp.ClientSession, machine: str
) -> None:
    image = first(await every_image(http, sim), writable)
    answer = await call(http, "PATCH", image_url(sim, image), json={"hw_machine_type": machine})
    assert answer.status == 200
    assert answer.json["hw_machine_type"] == machine


@pytest.mark.parametrize(
    "body",
    [
        {"colour": "red"},
        {"name": 5},
        {"name": ""},
        {"name": "x" * 256},
        {"os_type": "mac"},
        {"ssh_key": "maybe"},
        {"ssh_key": None},
        {"hw_firmware_type": "efi"},
        {"hw_machine_type": "i386"},
        {"is_baremetal": "yes"},
        {"tags": ["a", "b"]},
        {"tags": "a=b"},
        {"tags": {"bad key": "v"}},
        {"tags": {"a=b": "v"}},
        {"tags": {"": "v"}},
        {"tags": {"k": ""}},
        {"tags": {"k": "v w"}},
        {"tags": {"k": "tab\there"}},
        {"tags": {"k": "x" * 256}},
        {"tags": {"x" * 256: "v"}},
        {"tags": {"k": 5}},
        ["name", "x"],
        "just a string",
    ],
)
async def test_patch_validation_is_400_and_changes_nothing(
    sim: Simulator, http: aiohttp.ClientSession, body: Any
) -> None:
    image = first(await every_image(http, sim), writable)
    answer = await call(http, "PATCH", image_url(sim, image), json=body)
    assert answer.status == 400, answer.text
    assert answer.json["message"] and answer.json["exception_class"]
    assert (await call(http, "GET", image_url(sim, image))).json == image


async def test_patch_needs_json(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = first(await every_image(http, sim), writable)
    broken = await call(
        http, "PATCH", image_url(sim, image), data=b"{not json",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert broken.status == 400 and broken.json["exception_class"]
    form = await call(http, "PATCH", image_url(sim, image), data={"name": "x"})
    assert form.status == 415
    assert (await call(http, "GET", image_url(sim, image))).json == image


async def test_limits_of_tags_are_inclusive(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = first(await every_image(http, sim), writable)
    body = {"name": "n" * 255, "tags": {"k" * 255: "v" * 255, "a": "b"}}
    answer = await call(http, "PATCH", image_url(sim, image), json=body)
    assert answer.status == 200, answer.text
    assert tags_of(answer.json)["k" * 255] == "v" * 255


async def test_read_only_tags_are_refused(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = first(await every_image(http, sim), lambda i: writable(i) and read_only_of(i))
    ro = sorted(read_only_of(image))[0]
    for tags in ({ro: "changed"}, {ro: None}, {"fine": "yes", ro: tags_of(image)[ro]}):
        answer = await call(http, "PATCH", image_url(sim, image), json={"tags": tags})
        assert answer.status == 400
        assert answer.json["exception_class"] == "ReadOnlyTagError"
        assert ro in answer.json["message"]
    assert (await call(http, "GET", image_url(sim, image))).json == image


async def test_tags_null_removes_every_writable_tag(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    image = first(
        await every_image(http, sim),
        lambda i: writable(i) and read_only_of(i) and len(tags_of(i)) > len(read_only_of(i)),
    )
    assert sim.counters.patch_bodies_with_tags_null == 0
    answer = await call(http, "PATCH", image_url(sim, image), json={"tags": None})
    assert answer.status == 200
    kept = tags_of(answer.json)
    assert set(kept) == read_only_of(image)
    assert kept == {k: v for k, v in tags_of(image).items() if k in read_only_of(image)}
    assert sim.counters.patch_bodies_with_tags_null == 1


async def test_public_images_cannot_be_patched(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = first(await every_image(http, sim), lambda i: i["visibility"] == "public")
    answer = await call(http, "PATCH", image_url(sim, image), json={"ssh_key": "deny"})
    assert answer.status == 403
    assert answer.json["message"]
    assert (await call(http, "GET", image_url(sim, image))).json == image


async def test_added_and_deleted_images(sim: Simulator, http: aiohttp.ClientSession) -> None:
    before = await list_all(http, sim, 2001, 38)
    new_id = sim.add_image(
        2001, 38, name="added-one", tags={"team": "x"}, read_only={"gcore-source": "test"},
        visibility="shared", os_distro="debian",
    )  # fmt: skip
    after = await list_all(http, sim, 2001, 38)
    assert after["count"] == before["count"] + 1
    added = after["results"][-1]
    assert added["id"] == new_id and added["visibility"] == "shared"
    assert tags_of(added) == {"team": "x", "gcore-source": "test"}
    assert read_only_of(added) == {"gcore-source"}
    assert new_id in [
        i["id"] for i in (await list_all(http, sim, 2001, 38, os_distro="debian"))["results"]
    ]
    victim = before["results"][0]
    sim.delete_image(2001, 38, victim["id"])
    sim.delete_image(2001, 38, new_id)
    assert (await call(http, "GET", image_url(sim, victim))).status == 404
    patch = await call(http, "PATCH", image_url(sim, victim), json={"name": "x"})
    assert patch.status == 404
    assert (await call(http, "GET", image_url(sim, added))).status == 404
    final = await list_all(http, sim, 2001, 38)
    assert final["count"] == before["count"] - 1
    assert victim["id"] not in [i["id"] for i in final["results"]]
    with pytest.raises(KeyError):
        sim.image(2001, 38, victim["id"])


# -- auth -------------------------------------------------------------------------------------
async def test_auth(sim_factory: SimFactory) -> None:
    keyed = await sim_factory(SimConfig(api_key=KEY))
    url = f"{keyed.url}/cloud/v1/projects"
    async with aiohttp.ClientSession() as http:
        for headers in (
            {},
            {"Authorization": "APIKey wrong-key-999"},
            {"Authorization": f"Bearer {KEY}"},
            {"Authorization": "APIKey"},
            {"Authorization": KEY},
        ):
            answer = await call(http, "GET", url, headers=headers)
            assert answer.status == 401, headers
            assert answer.json["message"]
            assert KEY not in answer.text and "wrong-key-999" not in answer.text
            assert KEY not in str(dict(answer.headers))
        for scheme in ("APIKey", "apikey", "APIKEY"):
            ok = await call(http, "GET", url, headers={"Authorization": f"{scheme} {KEY}"})
            assert ok.status == 200
    assert keyed.counters.statuses[401] == 5
    assert KEY not in repr(keyed.config)


async def test_demo_mode_accepts_any_key(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{sim.url}/cloud/v1/regions"
        assert (await call(http, "GET", url, headers={"Authorization": "apikey x"})).status == 200
        assert (await call(http, "GET", url)).status == 401


# -- task locks -------------------------------------------------------------------------------
async def test_lock_409_then_success(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = first(await every_image(http, sim), lambda i: writable(i) and "team" in tags_of(i))
    task_id = sim.lock_image(
        image["project_id"], image["region_id"], image["id"], 0.4, set_tags={"locked-by": "task"}
    )
    got = (await call(http, "GET", image_url(sim, image))).json
    assert got["task_id"] == task_id
    refused = await call(http, "PATCH", image_url(sim, image), json={"ssh_key": "deny"})
    assert refused.status == 409
    assert task_id in refused.json["message"] and refused.json["task_id"] == task_id
    task = (await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{task_id}")).json
    assert task["id"] == task_id and task["state"] == "RUNNING"
    assert task["finished_on"] is None and task["error"] is None and task["task_type"]
    await asyncio.sleep(0.5)
    task = (await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{task_id}")).json
    assert task["state"] == "FINISHED" and task["finished_on"] >= task["created_on"]
    free = (await call(http, "GET", image_url(sim, image))).json
    assert free["task_id"] is None
    assert tags_of(free)["locked-by"] == "task"
    answer = await call(http, "PATCH", image_url(sim, image), json={"ssh_key": "deny"})
    assert answer.status == 200 and answer.json["ssh_key"] == "deny"


async def test_lock_that_never_ends_and_one_that_errors(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    images = [i for i in await every_image(http, sim) if writable(i)]
    forever = sim.lock_image(images[0]["project_id"], images[0]["region_id"], images[0]["id"], None)
    failing = sim.lock_image(
        images[1]["project_id"], images[1]["region_id"], images[1]["id"], 0.05, end_state="ERROR"
    )
    await asyncio.sleep(0.15)
    task = (await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{forever}")).json
    assert task["state"] == "RUNNING"
    assert (await call(http, "PATCH", image_url(sim, images[0]), json={})).status == 409
    task = (await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{failing}")).json
    assert task["state"] == "ERROR" and task["error"]
    assert (await call(http, "PATCH", image_url(sim, images[1]), json={})).status == 200
    # a test ends a lock when it chooses: the task FINISHED, the image free, once only
    sim.end_task(forever)
    task = (await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{forever}")).json
    assert task["state"] == "FINISHED" and task["finished_on"]
    assert (await call(http, "GET", image_url(sim, images[0]))).json["task_id"] is None
    assert (await call(http, "PATCH", image_url(sim, images[0]), json={})).status == 200
    sim.end_task(failing)  # ended already: stays ERROR
    task = (await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{failing}")).json
    assert task["state"] == "ERROR"
    with pytest.raises(KeyError):
        sim.end_task("no-such-task")


# -- faults -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["seconds", "date", "ms"])
async def test_fault_429_retry_after_forms(sim_factory: SimFactory, form: str) -> None:
    faulty = await sim_factory(
        SimConfig(faults=Faults(p_429=1.0, retry_after=form, retry_after_s=2.5))
    )
    async with aiohttp.ClientSession(headers=AUTH) as http:
        answer = await call(http, "GET", f"{faulty.url}/cloud/v1/images/1337/7")
    assert answer.status == 429
    assert answer.json["message"]
    header = answer.headers["Retry-After"]
    if form == "date":
        when = email.utils.parsedate_to_datetime(header).timestamp()
        assert 1.0 <= when - time.time() <= 3.5
    else:
        assert header == "3"
    if form == "ms":
        assert answer.headers["retry-after-ms"] == "2500"
    else:
        assert "retry-after-ms" not in answer.headers
    assert faulty.counters.faults["429"] == 1 and faulty.counters.rate_limited == 1


async def test_fault_5xx_is_an_html_page(sim_factory: SimFactory) -> None:
    faulty = await sim_factory(SimConfig(faults=Faults(p_5xx=1.0)))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        statuses = set()
        for _ in range(12):
            answer = await call(http, "GET", f"{faulty.url}/cloud/v1/projects")
            statuses.add(answer.status)
            assert answer.headers["Content-Type"].startswith("text/html")
            assert answer.text.lstrip().startswith("<html>")
            with pytest.raises(ValueError):
                json.loads(answer.text)
    assert statuses <= {500, 502, 503} and len(statuses) >= 2
    assert faulty.counters.faults["5xx"] == 12


async def test_faults_hit_only_their_methods(sim_factory: SimFactory) -> None:
    faulty = await sim_factory(SimConfig(faults=Faults(p_5xx=1.0, methods=frozenset({"PATCH"}))))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        page = await list_all(http, faulty, 1337, 7)
        image = first(page["results"], writable)
        answer = await call(http, "PATCH", image_url(faulty, image), json={"name": "x"})
        assert answer.status in (500, 502, 503)
        assert (await call(http, "GET", image_url(faulty, image))).json == image


async def test_drop_before_changes_nothing(sim: Simulator, http: aiohttp.ClientSession) -> None:
    image = first(await every_image(http, sim), writable)
    sim.set_faults(p_drop_before=1.0, methods=frozenset({"PATCH"}))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "PATCH", image_url(sim, image), json={"name": "dropped"})
    assert (await call(http, "GET", image_url(sim, image))).json == image
    key = (image["project_id"], image["region_id"], image["id"])
    assert sim.counters.faults["drop_before"] == 1
    assert sim.counters.patches_per_image[key] == 0
    assert sim.counters.applied_per_image[key] == 0


async def test_drop_after_applies_then_disconnects(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    image = first(await every_image(http, sim), writable)
    sim.set_faults(p_drop_after=1.0, methods=frozenset({"PATCH"}))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, "PATCH", image_url(sim, image), json={"name": "applied-anyway"})
    assert (await call(http, "GET", image_url(sim, image))).json["name"] == "applied-anyway"
    key = (image["project_id"], image["region_id"], image["id"])
    assert sim.counters.faults["drop_after"] == 1
    assert sim.counters.applied_per_image[key] == 1


async def test_dropped_get_reaches_the_client(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_faults(p_drop_before=1.0)
    # aiohttp's client retries an idempotent request once on a dropped connection
    with pytest.raises(aiohttp.ClientError):
        await call(http, "GET", f"{sim.url}/cloud/v1/projects")
    assert sim.counters.faults["drop_before"] >= 1
    assert sim.counters.statuses.total() == 0


@pytest.mark.timing
async def test_latency_is_added(sim: Simulator, http: aiohttp.ClientSession) -> None:
    url = f"{sim.url}/cloud/v1/projects"

    async def timed() -> float:
        began = time.perf_counter()
        assert (await call(http, "GET", url)).status == 200
        return time.perf_counter() - began

    base = min([await timed() for _ in range(3)])
    sim.set_faults(latency_ms=200.0, latency_jitter_ms=20.0)
    slow = min([await timed() for _ in range(3)])
    assert slow - base >= 0.15
    assert slow < base + 1.0
    assert sim.counters.faults["latency"] == 3


@pytest.mark.timing
async def test_token_bucket_limits_the_rate(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_faults(rate_limit=5.0, rate_burst=5.0)
    url = f"{sim.url}/cloud/v1/regions"
    answers = [await call(http, "GET", url) for _ in range(20)]
    statuses = [a.status for a in answers]
    assert statuses.count(200) in (5, 6)  # the burst, plus perhaps one token refilled meanwhile
    limited = [a for a in answers if a.status == 429]
    assert sim.counters.rate_limited == len(limited) >= 14
    for answer in limited:
        assert int(answer.headers["Retry-After"]) >= 1
        assert 0 < int(answer.headers["retry-after-ms"]) <= 200 + 50
    await asyncio.sleep(0.25)
    assert (await call(http, "GET", url)).status == 200


async def test_auth_fails_after_n_requests(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_faults(auth_fail_after=3)
    url = f"{sim.url}/cloud/v1/regions"
    statuses = [(await call(http, "GET", url)).status for _ in range(6)]
    assert statuses == [200, 200, 200, 401, 401, 401]
    assert sim.counters.faults["401"] == 3


async def test_faults_are_reproducible(sim_factory: SimFactory) -> None:
    runs = []
    for _ in range(2):
        faulty = await sim_factory(SimConfig(faults=Faults(seed=7, p_5xx=0.3, p_429=0.2)))
        async with aiohttp.ClientSession(headers=AUTH) as http:
            runs.append(
                [
                    (await call(http, "GET", f"{faulty.url}/cloud/v1/regions")).status
                    for _ in range(30)
                ]
            )
    assert runs[0] == runs[1]
    assert {200, 429} <= set(runs[0]) and set(runs[0]) & {500, 502, 503}


# -- counters and admin -----------------------------------------------------------------------
async def test_counters_by_kind(sim: Simulator, http: aiohttp.ClientSession) -> None:
    page = await list_all(http, sim, 1337, 7)
    image = first(page["results"], writable)
    await call(http, "GET", f"{sim.url}/cloud/v1/projects")
    await call(http, "GET", f"{sim.url}/cloud/v1/regions")
    await call(http, "GET", image_url(sim, image))
    await call(http, "PATCH", image_url(sim, image), json={"tags": {"a": "b"}})
    await call(http, "PATCH", image_url(sim, image), json={"bogus": 1})
    task_id = sim.lock_image(1337, 7, image["id"], 10)
    await call(http, "GET", f"{sim.url}/cloud/v1/tasks/{task_id}")
    await call(http, "GET", f"{sim.url}/_sim/counters")
    c = sim.counters
    assert {k: c.requests[k] for k in ("projects", "regions", "list", "get", "patch", "task")} == {
        "projects": 1, "regions": 1, "list": 1, "get": 1, "patch": 2, "task": 1,
    }  # fmt: skip
    assert c.total() == 7
    assert c.statuses == {200: 6, 400: 1}
    key = (1337, 7, image["id"])
    assert c.patches_per_image[key] == 2 and c.applied_per_image[key] == 1
    assert sum(c.per_second.values()) == 7
    assert c.max_per_second == 7
    as_json = json.loads(json.dumps(c.as_dict()))
    assert as_json["requests"]["patch"] == 2
    assert as_json["applied_per_image"] == {f"1337/7/{image['id']}": 1}
    sim.reset_counters()
    assert c.total() == 0 and not c.statuses and c.max_per_second == 0
    assert sim.counters is c


async def test_max_in_flight(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_faults(latency_ms=150.0)
    url = f"{sim.url}/cloud/v1/regions"
    answers = await asyncio.gather(*(call(http, "GET", url) for _ in range(8)))
    assert [a.status for a in answers] == [200] * 8
    assert sim.counters.max_in_flight == 8


async def test_admin_paths(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with aiohttp.ClientSession() as bare:  # no key: admin paths need none
        image = first(sim.images(), writable)
        where = f"{image['project_id']}/{image['region_id']}/{image['id']}"
        got = await call(bare, "GET", f"{sim.url}/_sim/images/{where}")
        assert got.json == image
        missing = await call(bare, "GET", f"{sim.url}/_sim/images/1337/7/nope")
        assert missing.status == 404
        faults = await call(bare, "POST", f"{sim.url}/_sim/faults", json={"p_429": 1.0})
        assert faults.status == 200 and faults.json["p_429"] == 1.0
        assert sim.faults.p_429 == 1.0
        assert (await call(http, "GET", f"{sim.url}/cloud/v1/projects")).status == 429
        bad = await call(bare, "POST", f"{sim.url}/_sim/faults", json={"p_429": 3})
        assert bad.status == 400
        unknown = await call(bare, "POST", f"{sim.url}/_sim/faults", json={"nope": 1})
        assert unknown.status == 400 and "nope" in unknown.json["message"]
        await call(bare, "POST", f"{sim.url}/_sim/faults", json={"p_429": 0.0})
        lock = await call(
            bare, "POST", f"{sim.url}/_sim/lock",
            json={"project_id": image["project_id"], "region_id": image["region_id"],
                  "image_id": image["id"], "seconds": 30},
        )  # fmt: skip
        task_id = lock.json["task_id"]
        assert sim.image(image["project_id"], image["region_id"], image["id"])["task_id"] == task_id
        counters = (await call(bare, "GET", f"{sim.url}/_sim/counters")).json
        assert counters["total"] == 1 and counters["statuses"] == {"429": 1}
        assert (await call(bare, "POST", f"{sim.url}/_sim/counters/reset")).status == 200
        assert sim.counters.total() == 0


def test_faults_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match="p_5xx"):
        Faults(p_5xx=1.5)
    with pytest.raises(ValueError, match="retry_after"):
        Faults(retry_after="minutes")
    with pytest.raises(ValueError, match="rate_limit"):
        Faults(rate_limit=0)
    with pytest.raises(TypeError, match="p_42"):
        Faults().replace(p_42=1.0)


# -- other ways to run it ---------------------------------------------------------------------
def test_simulator_thread_serves_another_loop() -> None:
    with SimulatorThread(SimConfig(images=20)) as st:
        assert st.url.startswith("http://127.0.0.1:")

        async def client() -> int:
            async with aiohttp.ClientSession(headers=AUTH) as http:
                return (await call(http, "GET", f"{st.url}/cloud/v1/images/1337/7")).json["count"]

        assert asyncio.run(client()) == 6
        images = st.call(st.sim.images)
        assert len(images) == 20
        image = first(images, writable)
        task_id = st.call(
            st.sim.lock_image, image["project_id"], image["region_id"], image["id"], 5
        )
        assert (
            st.call(st.sim.image, image["project_id"], image["region_id"], image["id"])["task_id"]
            == task_id
        )
        assert st.call(lambda: st.sim.counters.requests["list"]) == 1
        assert st.call(asyncio.sleep, 0, "awaited") == "awaited"
    with pytest.raises(RuntimeError):
        st.call(st.sim.images)


def test_sim_thread_fixture(sim_thread: SimulatorThread) -> None:
    assert len(sim_thread.call(sim_thread.sim.images)) == 60


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    code = (
        "from worker.simulator import serve, SimConfig; "
        "serve(SimConfig(images=9, api_key='k-123456'), port=0)"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("simulator listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]

        async def client() -> int:
            async with aiohttp.ClientSession(headers={"Authorization": "APIKey k-123456"}) as h:
                return (await call(h, "GET", f"{url}/cloud/v1/projects")).status

        assert asyncio.run(client()) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "k-123456" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

"""The official Gcore SDK (``gcore``, a dev dependency) as a real client of the simulator.

Every call runs with ``_strict_response_validation=True``: the SDK checks each answer against
its own models (generated from Gcore's OpenAPI spec), so an answer of the wrong shape fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

gcore = pytest.importorskip("gcore")

from worker.simulator import Simulator, SimulatorThread  # noqa: E402

KEY = "sdk-test-key-42"


@pytest.fixture
def client(sim_thread: SimulatorThread) -> Iterator[Any]:
    with gcore.Gcore(
        api_key=KEY, base_url=sim_thread.url, max_retries=0, _strict_response_validation=True
    ) as sdk:
        yield sdk


def state(sim_thread: SimulatorThread, image: Any) -> dict[str, Any]:
    return sim_thread.call(sim_thread.sim.image, image.project_id, image.region_id, image.id)  # type: ignore[no-any-return]


def tags(image: Any) -> dict[str, str]:
    return {t.key: t.value for t in image.tags_v2}


def test_projects_and_regions(client: Any) -> None:
    projects = client.cloud.projects.list()
    assert projects.count == 3
    assert {(p.id, p.name) for p in projects.results} == {
        (1337, "demo"), (1338, "staging"), (2001, "ml"),
    }  # fmt: skip
    regions = list(client.cloud.regions.list(limit=2))  # two pages, auto-paginated
    assert [r.display_name for r in regions] == ["Luxembourg 1", "Frankfurt", "Amsterdam"]
    assert all(r.state == "ACTIVE" for r in regions)


def test_list_and_get_images(client: Any, sim_thread: SimulatorThread) -> None:
    images = client.cloud.instances.images
    paged = list(images.list(project_id=1337, region_id=7, limit=4))  # auto-paginated
    expected = [
        i["id"] for i in sim_thread.call(sim_thread.sim.images)
        if (i["project_id"], i["region_id"]) == (1337, 7)
    ]  # fmt: skip
    assert [i.id for i in paged] == expected
    one = images.get(paged[0].id, project_id=1337, region_id=7)
    assert one.id == paged[0].id and one.name == paged[0].name
    assert one.created_at.tzinfo is not None
    private = images.list(project_id=1337, region_id=7, visibility="private")
    assert private.count == len(private.results) > 0
    assert all(i.visibility == "private" for i in private.results)
    both = images.list(project_id=1337, region_id=7, tag_key=["team", "env"])
    assert all({"team", "env"} <= tags(i).keys() for i in both.results)
    named = images.list(project_id=1337, region_id=7, name="MY-APP")
    assert named.results and all("my-app" in i.name for i in named.results)


def test_update_tags_and_ssh_key(client: Any, sim_thread: SimulatorThread) -> None:
    images = client.cloud.instances.images
    target = next(
        i for i in images.list(project_id=1337, region_id=7).results
        if i.visibility == "private" and "team" in tags(i)
        and not any(t.read_only for t in i.tags_v2 if t.key in ("owner", "team"))
    )  # fmt: skip
    before = tags(target)
    updated = images.update(
        target.id, project_id=1337, region_id=7, ssh_key="required",
        tags={"owner": before["team"], "managed-by": "bulk-tagger"},
        hw_machine_type="q35", is_baremetal=False,
    )  # fmt: skip
    assert updated.ssh_key == "required"
    assert tags(updated) == {**before, "owner": before["team"], "managed-by": "bulk-tagger"}
    removed = images.update(target.id, project_id=1337, region_id=7, tags={"team": None})
    assert "team" not in tags(removed) and tags(removed)["owner"] == before["team"]
    stored = state(sim_thread, target)
    assert stored["ssh_key"] == "required"
    assert {t["key"]: t["value"] for t in stored["tags"]} == tags(removed)
    assert (
        sim_thread.call(lambda: sim_thread.sim.counters.applied_per_image[(1337, 7, target.id)])
        == 2
    )


def test_errors_map_to_sdk_exceptions(client: Any, sim_thread: SimulatorThread) -> None:
    images = client.cloud.instances.images
    every = images.list(project_id=1337, region_id=7).results
    with pytest.raises(gcore.NotFoundError):
        images.get("00000000-0000-4000-8000-000000000000", project_id=1337, region_id=7)
    with pytest.raises(gcore.NotFoundError):
        images.list(project_id=1337, region_id=12345)
    public = next(i for i in every if i.visibility == "public")
    with pytest.raises(gcore.PermissionDeniedError):
        images.update(public.id, project_id=1337, region_id=7, name="mine-now")
    guarded = next(
        i for i in every if i.visibility != "public" and any(t.read_only for t in i.tags_v2)
    )
    ro_key = next(t.key for t in guarded.tags_v2 if t.read_only)
    with pytest.raises(gcore.BadRequestError) as refused:
        images.update(guarded.id, project_id=1337, region_id=7, tags={ro_key: None})
    assert ro_key in str(refused.value)
    assert state(sim_thread, guarded)["tags"] == [t.model_dump() for t in guarded.tags_v2]


def test_locked_image_and_its_task(client: Any, sim_thread: SimulatorThread) -> None:
    images = client.cloud.instances.images
    target = next(
        i for i in images.list(project_id=1338, region_id=7).results if i.visibility != "public"
    )
    task_id = sim_thread.call(sim_thread.sim.lock_image, 1338, 7, target.id, 60)
    assert images.get(target.id, project_id=1338, region_id=7).task_id == task_id
    with pytest.raises(gcore.ConflictError):
        images.update(target.id, project_id=1338, region_id=7, ssh_key="deny")
    task = client.cloud.tasks.get(task_id)
    assert task.id == task_id and task.state == "RUNNING" and task.finished_on is None
    assert state(sim_thread, target)["ssh_key"] == target.ssh_key


async def test_async_client_in_the_same_loop(sim: Simulator) -> None:
    async with gcore.AsyncGcore(
        api_key=KEY, base_url=sim.url, max_retries=0, _strict_response_validation=True
    ) as sdk:
        page = await sdk.cloud.instances.images.list(project_id=2001, region_id=76)
        target = next(i for i in page.results if i.visibility != "public")
        updated = await sdk.cloud.instances.images.update(
            target.id, project_id=2001, region_id=76, name="renamed-by-sdk", os_type="linux"
        )
    assert updated.name == "renamed-by-sdk"
    assert sim.image(2001, 76, target.id)["name"] == "renamed-by-sdk"

"""Selectors over the real simulator: queries, files, joins, dedup, and what they cost."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tests.helpers import NoLimiter, write_job
from worker import api, retry, spec
from worker.models import Target
from worker.selectors import READ_AHEAD, Expander, Shard
from worker.simulator import Faults, SimConfig


async def expand(
    job_path: Path, url: str, tmp_path: Path, shard: Shard | None = None
) -> tuple[list[Target], api.RequestCounts]:
    job = spec.load_job(job_path, env={})
    settings = api.Settings(base_url=url, api_key="k-1234")
    async with api.Client.open(settings, NoLimiter()) as client:
        expander = Expander(
            job, client, stage_path=tmp_path / "stage.sqlite",
            policy=retry.RetryPolicy(budget_s=5, base_s=0.01), shard=shard,
        )
        targets = [t async for t in expander.targets()]
        return targets, client.counts


def csv_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


async def test_query_all_projects_and_regions_with_filters(
    sim_factory: Any, tmp_path: Path
) -> None:
    sim = await sim_factory(SimConfig(images=300, page_max=50))
    job = write_job(tmp_path, {
        "name": "q",
        "targets": [{"query": {"projects": "all", "regions": "all", "visibility": "private",
                               "name_glob": "*-x64*"}}],
        "changes": {"set_tags": {"a": "b"}},
        "options": {"page_size": 50},
    })
    targets, counts = await expand(job, sim.url, tmp_path)
    expected = {
        (i["project_id"], i["region_id"], i["id"]) for i in sim.images()
        if i["visibility"] == "private" and "-x64" in i["name"]
    }
    assert expected  # the demo data has such images
    assert {t.key for t in targets} == expected
    assert len(targets) == len(expected)  # each once
    assert all(t.image is not None and t.image.id == t.image_id for t in targets)
    # one list GET per page of each region's private images, nothing else but the expansions
    pages = 0
    for p in (1337, 1338, 2001):
        for r in (7, 76, 38):
            n = sum(1 for i in sim.images() if i["project_id"] == p and i["region_id"] == r
                    and i["visibility"] == "private")
            pages += max(1, -(-n // 50))
    assert counts.by_kind["list"] == pages
    assert counts.by_kind["projects"] == 1 and counts.by_kind["regions"] == 1
    assert counts.by_kind["get"] == 0 and counts.by_kind["patch"] == 0


async def test_file_rows_in_one_region_are_joined_not_fetched_one_by_one(
    sim_factory: Any, tmp_path: Path
) -> None:
    sim = await sim_factory(SimConfig(images=9000))
    region = [i for i in sim.images() if i["project_id"] == 1337 and i["region_id"] == 7]
    assert len(region) > 900
    rows = [{"project_id": 1337, "region_id": 7, "image_id": i["id"], "tag:owner": "x"}
            for i in region]
    rows.append({"project_id": 1337, "region_id": 7,
                 "image_id": "00000000-0000-4000-8000-00000000dead", "tag:owner": "x"})
    csv_file(tmp_path / "rows.csv", rows)
    job = write_job(tmp_path, {"name": "f", "targets": [{"file": "rows.csv"}], "changes": {}})
    targets, counts = await expand(job, sim.url, tmp_path)
    assert len(targets) == len(rows)
    missing = [t for t in targets if t.image is None]
    assert [t.image_id for t in missing] == ["00000000-0000-4000-8000-00000000dead"]
    reads = counts.by_kind["list"] + counts.by_kind["get"]
    # N rows in one region: the region is listed once (1000 a page), plus one GET for the
    # row the listing did not show
    assert reads <= len(rows) / 100, counts.by_kind
    assert counts.by_kind["get"] == 1


async def test_a_few_rows_in_a_big_region_cost_one_get_each(
    sim_factory: Any, tmp_path: Path
) -> None:
    sim = await sim_factory(SimConfig(images=9000, page_max=100))
    region = [i for i in sim.images() if i["project_id"] == 1338 and i["region_id"] == 76]
    picked = region[500:505]
    csv_file(tmp_path / "rows.csv", [
        {"project_id": 1338, "region_id": 76, "image_id": i["id"], "tag:k": "v"} for i in picked
    ])
    job = write_job(tmp_path, {"name": "f", "targets": [{"file": "rows.csv"}], "changes": {},
                               "options": {"page_size": 100}})
    targets, counts = await expand(job, sim.url, tmp_path)
    assert {t.image_id for t in targets} == {i["id"] for i in picked}
    # one list page to learn the region's size, then a GET a row: never ~10 pages
    assert counts.by_kind["list"] == 1
    assert counts.by_kind["get"] == 5


async def test_each_image_once_and_row_changes_win(sim_factory: Any, tmp_path: Path) -> None:
    sim = await sim_factory(SimConfig(images=60))
    private = [i for i in sim.images() if i["visibility"] == "private"]
    one, two = private[0], private[1]
    csv_file(tmp_path / "a.csv", [
        {"project_id": one["project_id"], "region_id": one["region_id"], "image_id": one["id"],
         "tag:env": "from-row"},
    ])
    where = {"project_id": two["project_id"], "region_id": two["region_id"],
             "image_id": two["id"]}
    (tmp_path / "b.jsonl").write_text(
        json.dumps({**where, "set_tags": {"x": "1"}}) + "\n"
        + json.dumps({**where, "set_tags": {"y": "2"}}) + "\n"  # rows that agree add up
    )
    job = write_job(tmp_path, {
        "name": "d",
        "targets": [
            {"query": {"projects": "all", "regions": "all", "visibility": "private"}},
            {"query": {"projects": [one["project_id"]], "regions": [one["region_id"]]}},
            {"file": "a.csv"},
            {"file": "b.jsonl"},
        ],
        "changes": {"set_tags": {"env": "from-job", "managed": "yes"}},
    })
    targets, _ = await expand(job, sim.url, tmp_path)
    keys = [t.key for t in targets]
    assert len(keys) == len(set(keys))
    by_id = {t.image_id: t for t in targets}
    assert dict(by_id[one["id"]].changes.set_tags) == {"env": "from-row", "managed": "yes"}
    assert dict(by_id[two["id"]].changes.set_tags) == {"env": "from-job", "managed": "yes",
                                                       "x": "1", "y": "2"}
    assert {t.image_id for t in targets} >= {i["id"] for i in private}


async def test_shards_are_disjoint_and_complete(sim_factory: Any, tmp_path: Path) -> None:
    sim = await sim_factory(SimConfig(images=500))
    job = write_job(tmp_path, {
        "name": "s", "targets": [{"query": {"projects": "all", "regions": "all"}}],
        "changes": {"set_tags": {"a": "b"}},
    })
    seen: list[set[tuple[int, int, str]]] = []
    for index in range(3):
        targets, _ = await expand(job, sim.url, tmp_path, shard=Shard(index, 3))
        seen.append({t.key for t in targets})
    everything = {(i["project_id"], i["region_id"], i["id"]) for i in sim.images()}
    assert seen[0] | seen[1] | seen[2] == everything
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(len(s) > 100 for s in seen)  # a fair split, not all in one


async def test_a_query_reads_pages_ahead_across_regions(sim_factory: Any, tmp_path: Path) -> None:
    """Up to READ_AHEAD list requests at once (the next regions' first pages while this one's
    are planned), and still one request per page and every image once."""
    sim = await sim_factory(SimConfig(images=600, page_max=50, faults=Faults(latency_ms=20)))
    job = write_job(tmp_path, {
        "name": "q", "targets": [{"query": {"projects": "all", "regions": "all"}}],
        "changes": {"set_tags": {"a": "b"}}, "options": {"page_size": 50},
    })
    targets, counts = await expand(job, sim.url, tmp_path)
    images = sim.images()
    assert sorted(t.image_id for t in targets) == sorted(i["id"] for i in images)
    per_region: dict[tuple[int, int], int] = {}
    for i in images:
        key = (i["project_id"], i["region_id"])
        per_region[key] = per_region.get(key, 0) + 1
    assert counts.by_kind["list"] == sum(-(-n // 50) for n in per_region.values())
    assert sim.counters.max_in_flight == READ_AHEAD



async def test_a_region_the_api_does_not_know_is_skipped_and_the_rest_expanded(
    sim_factory: Any, tmp_path: Path
) -> None:
    """A 404 on a region's list (a typo in regions:, a region closed) skips that region with a
    warning; the regions before and after it, read ahead around it, still come out whole."""
    sim = await sim_factory(SimConfig(images=300, page_max=20))
    job = write_job(tmp_path, {
        "name": "q", "targets": [{"query": {"projects": [1337], "regions": [7, 999, 76]}}],
        "changes": {"set_tags": {"a": "b"}}, "options": {"page_size": 20},
    })
    targets, counts = await expand(job, sim.url, tmp_path)
    wanted = [i["id"] for i in sim.images()
              if i["project_id"] == 1337 and i["region_id"] in (7, 76)]
    assert len(wanted) > 40
    assert sorted(t.image_id for t in targets) == sorted(wanted)
    assert counts.by_kind["list"] == sum(
        -(-sum(1 for i in sim.images() if (i["project_id"], i["region_id"]) == (1337, r)) // 20)
        for r in (7, 76)
    ) + 1  # the one 404

"""The job language users reach for next: ``add_tags``, template defaults, age filters and glob
values in ``has_tags``/``missing_tags`` (README, "A job file").

Property tests check each against a plain Python statement of it, over generated images and
over the simulator's own images; one run through the real CLI checks them end to end."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import results, run_cli, run_dirs, summary, write_job
from worker.errors import JobError
from worker.models import Changes, Image, RunContext
from worker.plan import apply_patch, plan_changes
from worker.simulator import SimConfig, SimulatorThread
from worker.spec import load_job
from worker.spec.models import Query, image_time
from worker.templates import render

CTX = RunContext(run_id="r-1", run_date="2026-01-02")
KEYS = st.sampled_from(["owner", "team", "env", "cost", "x"])
VALUES = st.text(alphabet="abcxyz-_.0", min_size=1, max_size=6)


def _image(tags: dict[str, str], **raw: Any) -> Image:
    doc = {"id": "i-1", "name": "n", **raw,
           "tags": [{"key": k, "value": v, "read_only": False} for k, v in tags.items()]}
    return Image.from_api(doc, project_id=1, region_id=2)


@pytest.fixture(scope="module")
def sim_images() -> list[Image]:
    with SimulatorThread(SimConfig(images=300)) as thread:
        docs = thread.call(thread.sim.images)
    return [Image.from_api(doc) for doc in docs]


# -- add_tags --------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(tags=st.dictionaries(KEYS, VALUES, max_size=5),
       adds=st.dictionaries(KEYS, VALUES, min_size=1, max_size=5))
def test_add_tags_never_overwrites(tags: dict[str, str], adds: dict[str, str]) -> None:
    plan = plan_changes(_image(tags), Changes(add_tags=adds), CTX)
    after = apply_patch({"tags": tags}, plan.patch or {})["tags"]
    # every key the image held keeps its value; every missing one is added
    assert after == {**adds, **tags}
    assert plan.patch is None or set(plan.patch["tags"]) == set(adds) - set(tags)
    if plan.patch is None:
        assert plan.status == "unchanged"
        for key, value in adds.items():
            if tags.get(key) != value:  # the plan says which keys it kept
                assert f"add_tags {key!r}" in (plan.detail or "")


def test_add_tags_with_set_tags_in_the_job_file(tmp_path: Path) -> None:
    job = write_job(tmp_path, {
        "name": "adds", "targets": [{"query": {"projects": [1], "regions": [2]}}],
        "changes": {"set_tags": {"owner": "a"}, "add_tags": {"owner": "b"}},
    })
    with pytest.raises(JobError, match="add_tags"):
        load_job(job)


# -- template defaults -----------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(tags=st.dictionaries(KEYS, VALUES, max_size=4), key=KEYS, default=VALUES,
       os_version=st.one_of(st.none(), VALUES))
def test_defaults_render(
    tags: dict[str, str], key: str, default: str, os_version: str | None
) -> None:
    image = _image(tags, os_version=os_version)
    assert render(f"{{tags.{key}|{default}}}", image, CTX) == tags.get(key, default)
    shown = os_version if os_version is not None else default
    assert render(f"v-{{image.os_version|{default}}}", image, CTX) == f"v-{shown}"
    assert render("{image.os_version|}", image, CTX) == (os_version or "")


# -- filters ---------------------------------------------------------------------------------
def _plain(
    image: Image, now: datetime, *, created_before: str | None, updated_after: str | None,
    has: dict[str, str], missing: dict[str, str],
) -> bool:
    """The filters as a person states them."""
    def edge(text: str) -> datetime:
        if text.endswith("d"):
            return now - timedelta(days=int(text[:-1]))
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    created = datetime.fromisoformat(image.raw["created_at"].replace("Z", "+00:00"))
    updated = datetime.fromisoformat(image.raw["updated_at"].replace("Z", "+00:00"))
    if created_before is not None and not created < edge(created_before):
        return False
    if updated_after is not None and not updated > edge(updated_after):
        return False
    for key, pattern in has.items():
        if key not in image.tags or not fnmatch.fnmatchcase(image.tags[key], pattern):
            return False
    return not any(key in image.tags and fnmatch.fnmatchcase(image.tags[key], pattern)
                   for key, pattern in missing.items())


MOMENTS = st.one_of(
    st.none(),
    st.dates(min_value=datetime(2022, 12, 1).date(), max_value=datetime(2025, 1, 1).date())
    .map(str),
    st.integers(min_value=600, max_value=1500).map(lambda d: f"{d}d"),
)
GLOBS = st.sampled_from(["*", "cc-*", "cc-[12]*", "prod", "s*", "*a*", "?l", "team-*", "te?t"])
TAG_KEYS = st.sampled_from(["env", "team", "owner", "cost-centre", "legacy", "billing-class"])


@settings(max_examples=150, deadline=None)
@given(created_before=MOMENTS, updated_after=MOMENTS,
       has=st.dictionaries(TAG_KEYS, GLOBS, max_size=2),
       missing=st.dictionaries(TAG_KEYS, GLOBS, max_size=2))
def test_age_and_glob_filters_agree_with_plain_python(
    sim_images: list[Image], created_before: str | None, updated_after: str | None,
    has: dict[str, str], missing: dict[str, str],
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    query = Query.model_validate({
        "projects": "all", "regions": "all", "created_before": created_before,
        "updated_after": updated_after, "has_tags": has, "missing_tags": missing,
    })
    match = query.matcher(now) or (lambda image: True)
    got = [image.id for image in sim_images if match(image)]
    want = [image.id for image in sim_images if _plain(
        image, now, created_before=created_before, updated_after=updated_after,
        has=has, missing=missing)]
    assert got == want


def test_a_bad_age_names_its_field(tmp_path: Path) -> None:
    job = write_job(tmp_path, {
        "name": "ages", "targets": [{"query": {"projects": [1], "regions": [2],
                                               "created_before": "last tuesday"}}],
        "changes": {"set_tags": {"a": "b"}},
    })
    proc = run_cli("validate", job)
    assert proc.returncode == 2
    assert "created_before" in proc.stderr and "neither a date nor a duration" in proc.stderr


# -- end to end --------------------------------------------------------------------------------
def test_the_new_language_through_the_cli(tmp_path: Path) -> None:
    """One run: an age filter and a glob select; add_tags keeps held keys; defaults fill in."""
    with SimulatorThread(SimConfig(images=120)) as thread:
        before = {image["id"]: image for image in thread.call(thread.sim.images)}
        job = write_job(tmp_path, {
            "name": "language",
            "targets": [{"query": {
                "projects": "all", "regions": "all", "visibility": "private",
                "created_before": "2024-06-01", "has_tags": {"env": "*i*"},
                "missing_tags": {"team": "p*"},
            }}],
            "changes": {
                "add_tags": {"owner": "nobody"},
                "set_tags": {"who": "{tags.owner|unknown}", "osv": "{image.os_version|none}"},
            },
        })
        plan = run_cli("plan", job, "--base-url", thread.url, "--state-dir", tmp_path / "p")
        assert plan.returncode == 0, plan.stdout + plan.stderr
        proc = run_cli("run", job, "--base-url", thread.url, "--state-dir", tmp_path / "s")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        after = {image["id"]: image for image in thread.call(thread.sim.images)}
    cutoff = datetime(2024, 6, 1, tzinfo=UTC)

    def tags(doc: dict[str, Any]) -> dict[str, str]:
        return {t["key"]: t["value"] for t in doc.get("tags") or []}

    chosen = set()
    for image_id, doc in before.items():
        held = tags(doc)
        created = image_time(doc["created_at"])
        assert created is not None
        if (doc["visibility"] == "private" and created < cutoff
                and fnmatch.fnmatchcase(held.get("env", ""), "*i*") and "env" in held
                and not ("team" in held and fnmatch.fnmatchcase(held["team"], "p*"))):
            chosen.add(image_id)
            now = tags(after[image_id])
            assert now["owner"] == held.get("owner", "nobody")  # never overwritten
            assert now["who"] == held.get("owner", "unknown")
            assert now["osv"] == (doc.get("os_version") or "none")
        else:
            assert tags(after[image_id]) == held
    assert chosen
    # the plan says, per key, on how many images add_tags kept a value held
    kept = sum(1 for i in chosen if tags(before[i]).get("owner", "nobody") != "nobody")
    assert kept and f"kept on {kept} (add_tags: the image holds another value)" in plan.stdout
    (plan_dir,) = run_dirs(tmp_path / "p")
    assert summary(plan_dir)["changes_per_key"]["tags.owner"]["kept"] == kept
    (run_dir,) = run_dirs(tmp_path / "s")
    assert {r["image_id"] for r in results(run_dir)} == chosen

"""Changes.merged: a row's changes added to the job's, the row winning on the same key."""

from __future__ import annotations

from worker.models import Changes, Image

JOB = Changes(
    set_tags={"managed": "yes", "env": "job"},
    remove_tags=("legacy",),
    rename_tags={"team": "owner"},
    set_fields={"ssh_key": "allow"},
)


def test_row_set_wins_over_job_remove_and_set() -> None:
    merged = JOB.merged(Changes(set_tags={"legacy": "keep", "env": "row"}))
    assert merged.set_tags == {"managed": "yes", "env": "row", "legacy": "keep"}
    assert "legacy" not in merged.remove_tags


def test_row_remove_wins_over_job_set() -> None:
    merged = JOB.merged(Changes(remove_tags=("env",)))
    assert "env" not in merged.set_tags
    assert set(merged.remove_tags) == {"legacy", "env"}


def test_row_setting_a_rename_target_turns_the_rename_into_a_removal() -> None:
    merged = JOB.merged(Changes(set_tags={"owner": "alice"}))
    assert merged.rename_tags == {}
    assert merged.set_tags["owner"] == "alice"
    assert "team" in merged.remove_tags


def test_row_fields_win_and_empty_rows_change_nothing() -> None:
    assert JOB.merged(Changes()) is JOB
    assert JOB.merged(Changes(set_fields={"ssh_key": "deny"})).set_fields == {"ssh_key": "deny"}


def test_replace_tags_takes_row_tags_in() -> None:
    job = Changes(replace_tags={"a": "1", "b": "2"})
    merged = job.merged(Changes(set_tags={"c": "3"}, remove_tags=("a",)))
    assert merged.replace_tags == {"b": "2", "c": "3"}


def test_image_reads_tags_or_tags_v2_and_keeps_unknown_values() -> None:
    image = Image.from_api({
        "id": "x", "project_id": 1, "region_id": 2, "name": "n",
        "tags_v2": [{"key": "k", "value": "v", "read_only": True}],
        "hw_machine_type": "i440", "brand_new_field": 1,
    })
    assert image.tags == {"k": "v"} and image.read_only == frozenset({"k"})
    assert image.state()["hw_machine_type"] == "i440"

"""The plan stage: unit tests of each rule, and property tests over generated images."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_image
from worker.models import Changes, Image, RunContext
from worker.plan import (
    Plan,
    apply_patch,
    inverse_patch,
    plan_changes,
    shows,
)
from worker.templates import render

CTX = RunContext(run_id="run-42", run_date="2024-05-06")


def after(image: Image, patch: dict[str, Any]) -> Image:
    """The image as the API would return it once ``patch`` is applied (read-only flags kept)."""
    state = apply_patch(image.state(), patch)
    raw = {k: v for k, v in image.raw.items() if k != "tags"}
    raw.update({k: v for k, v in state.items() if k != "tags"})
    raw["tags"] = [
        {"key": k, "value": v, "read_only": k in image.read_only} for k, v in state["tags"].items()
    ]
    return Image.from_api(raw)


# --- Plan.status ---------------------------------------------------------------------------


def test_status_follows_patch_and_reason() -> None:
    assert Plan({"name": "x"}).status == "planned"
    assert Plan({"name": "x"}, "read_only", "tag 'a'").status == "planned"
    assert Plan(None, "unchanged").status == "unchanged"
    assert Plan(None, "read_only").status == "skipped"
    assert Plan(None, "rename_conflict").status == "skipped"
    assert Plan(None, "template").status == "failed"


# --- templates -----------------------------------------------------------------------------


def test_template_gap_fails_the_target() -> None:
    plan = plan_changes(make_image(), Changes(set_tags={"owner": "{tags.team}"}), CTX)
    assert plan.patch is None
    assert plan.status == "failed"
    assert plan.reason == "template"
    assert plan.detail is not None
    assert "set_tags 'owner'" in plan.detail
    assert "no tag 'team'" in plan.detail


def test_rendered_tag_value_must_be_a_valid_tag() -> None:
    image = make_image(description="has spaces in it")
    plan = plan_changes(image, Changes(set_tags={"d": "{image.description}"}), CTX)
    assert plan.status == "failed"
    assert plan.reason == "template"
    assert "whitespace" in (plan.detail or "")
    plan = plan_changes(make_image(), Changes(set_tags={"d": "x" * 250 + "{image.name}"}), CTX)
    assert plan.reason == "template"
    assert "at most 255" in (plan.detail or "")


def test_rendered_enum_field_must_be_allowed() -> None:
    image = make_image(description="maybe")
    plan = plan_changes(image, Changes(set_fields={"ssh_key": "{image.description}"}), CTX)
    assert plan.reason == "template"
    assert "allow, deny, required" in (plan.detail or "")
    image = make_image(description="deny")
    plan = plan_changes(image, Changes(set_fields={"ssh_key": "{image.description}"}), CTX)
    assert plan.patch == {"ssh_key": "deny"}


def test_rendered_name_must_not_be_empty() -> None:
    image = make_image(description="")
    plan = plan_changes(image, Changes(set_fields={"name": "{image.description}"}), CTX)
    assert plan.reason == "template"
    assert "empty" in (plan.detail or "")


def test_unknown_field_and_bad_boolean_fail() -> None:
    plan = plan_changes(make_image(), Changes(set_fields={"colour": "red"}), CTX)
    assert plan.status == "failed"
    assert "not a settable field" in (plan.detail or "")
    plan = plan_changes(make_image(), Changes(set_fields={"is_baremetal": "maybe"}), CTX)
    assert plan.status == "failed"
    assert "true/false, yes/no or 1/0" in (plan.detail or "")
    # the one text rule (worker.templates.bool_from_text), as the job file reads it
    for text in ("TRUE", "yes", " 1 "):
        plan = plan_changes(make_image(), Changes(set_fields={"is_baremetal": text}), CTX)
        assert plan.patch == {"is_baremetal": True}


def test_literal_changes_are_sent_as_they_are() -> None:
    """Undo's changes (Changes.from_patch) restore values an image held: never rendered."""
    image = make_image({"v": "new", "w": "x"}, name="renamed")
    patch = {"tags": {"v": "{image.name}", "w": "{{a}}", "u": "a{b", "x": None}, "name": "}{"}
    plan = plan_changes(image, Changes.from_patch(patch), CTX)
    assert plan.patch == {
        "tags": {"v": "{image.name}", "w": "{{a}}", "u": "a{b"},
        "name": "}{",
    }
    # the same text as a template is rendered (or refused)
    plan = plan_changes(image, Changes(set_tags={"v": "{image.name}"}), CTX)
    assert plan.patch == {"tags": {"v": "renamed"}}
    assert plan_changes(image, Changes(set_tags={"u": "a{b"}), CTX).reason == "template"


def test_literal_and_template_changes_do_not_merge() -> None:
    with pytest.raises(ValueError, match="literal"):
        Changes(set_tags={"a": "b"}).merged(Changes.from_patch({"tags": {"c": "d"}}))


# --- set_tags ------------------------------------------------------------------------------


def test_set_tags_sends_only_what_differs() -> None:
    image = make_image({"env": "prod", "team": "core"})
    plan = plan_changes(image, Changes(set_tags={"env": "prod", "team": "web", "new": "1"}), CTX)
    assert plan.patch == {"tags": {"team": "web", "new": "1"}}
    assert plan.status == "planned"
    assert plan.reason is None


def test_set_tags_already_so_is_unchanged() -> None:
    image = make_image({"env": "prod"})
    plan = plan_changes(image, Changes(set_tags={"env": "prod"}), CTX)
    assert plan.patch is None
    assert plan.status == "unchanged"
    assert plan.reason == "unchanged"


def test_set_tags_on_read_only_skips_the_target() -> None:
    image = make_image({"env": "prod"}, read_only={"billing": "acme"})
    plan = plan_changes(image, Changes(set_tags={"billing": "other", "env": "dev"}), CTX)
    assert plan.patch is None
    assert plan.status == "skipped"
    assert plan.reason == "read_only"
    assert "'billing'" in (plan.detail or "")


def test_set_tags_on_read_only_with_same_value_is_fine() -> None:
    image = make_image({"env": "prod"}, read_only={"billing": "acme"})
    plan = plan_changes(image, Changes(set_tags={"billing": "acme", "env": "dev"}), CTX)
    assert plan.patch == {"tags": {"env": "dev"}}


def test_set_tags_renders_from_current_tags() -> None:
    image = make_image({"team": "core"})
    changes = Changes(set_tags={"owner": "{tags.team}-{run.date}"}, remove_tags=("team",))
    plan = plan_changes(image, changes, CTX)
    assert plan.patch == {"tags": {"team": None, "owner": "core-2024-05-06"}}


# --- remove_tags ---------------------------------------------------------------------------


def test_remove_tags() -> None:
    image = make_image({"legacy": "1", "env": "prod"})
    plan = plan_changes(image, Changes(remove_tags=("legacy", "absent")), CTX)
    assert plan.patch == {"tags": {"legacy": None}}


def test_remove_absent_tag_is_unchanged() -> None:
    plan = plan_changes(make_image({"env": "prod"}), Changes(remove_tags=("legacy",)), CTX)
    assert plan.status == "unchanged"


def test_remove_read_only_tag_is_read_only() -> None:
    image = make_image({"legacy": "1"}, read_only={"billing": "acme"})
    plan = plan_changes(image, Changes(remove_tags=("billing", "legacy")), CTX)
    assert plan.reason == "read_only"
    assert plan.status == "skipped"
    assert "'billing'" in (plan.detail or "")
    assert "remove_tags" in (plan.detail or "")


# --- rename_tags ---------------------------------------------------------------------------


def test_rename_moves_the_value() -> None:
    plan = plan_changes(make_image({"team": "core"}), Changes(rename_tags={"team": "owner"}), CTX)
    assert plan.patch == {"tags": {"team": None, "owner": "core"}}


def test_rename_of_absent_key_is_nothing() -> None:
    plan = plan_changes(make_image({"env": "x"}), Changes(rename_tags={"team": "owner"}), CTX)
    assert plan.status == "unchanged"


def test_rename_onto_same_value_just_removes_old() -> None:
    image = make_image({"team": "core", "owner": "core"})
    plan = plan_changes(image, Changes(rename_tags={"team": "owner"}), CTX)
    assert plan.patch == {"tags": {"team": None}}


def test_rename_onto_other_value_is_a_conflict() -> None:
    image = make_image({"team": "core", "owner": "web"})
    plan = plan_changes(image, Changes(rename_tags={"team": "owner"}), CTX)
    assert plan.patch is None
    assert plan.status == "skipped"
    assert plan.reason == "rename_conflict"
    assert "'owner' already holds 'web'" in (plan.detail or "")


@pytest.mark.parametrize("ro", [{"team": "core"}, {"owner": "web"}])
def test_rename_from_or_to_read_only_is_read_only(ro: dict[str, str]) -> None:
    tags = {"team": "core", "owner": "web"}
    for k in ro:
        del tags[k]
    plan = plan_changes(make_image(tags, read_only=ro), Changes(rename_tags={"team": "owner"}), CTX)
    assert plan.patch is None
    assert plan.reason == "read_only"
    assert repr(next(iter(ro))) in (plan.detail or "")


def test_renames_apply_one_after_another() -> None:
    plan = plan_changes(make_image({"a": "1"}), Changes(rename_tags={"a": "b", "b": "c"}), CTX)
    assert plan.patch == {"tags": {"a": None, "c": "1"}}
    # Two renames onto one key: the second sees the first's value.
    image = make_image({"a": "1", "b": "2"})
    plan = plan_changes(image, Changes(rename_tags={"a": "c", "b": "c"}), CTX)
    assert plan.reason == "rename_conflict"
    assert "'b' -> 'c'" in (plan.detail or "")


# --- order: renames, removes, sets ---------------------------------------------------------


def test_set_wins_over_remove_of_same_key() -> None:
    image = make_image({"env": "prod"})
    plan = plan_changes(image, Changes(remove_tags=("env",), set_tags={"env": "dev"}), CTX)
    assert plan.patch == {"tags": {"env": "dev"}}
    plan = plan_changes(image, Changes(remove_tags=("env",), set_tags={"env": "prod"}), CTX)
    assert plan.status == "unchanged"


def test_remove_applies_after_rename() -> None:
    image = make_image({"team": "core"})
    plan = plan_changes(image, Changes(rename_tags={"team": "owner"}, remove_tags=("owner",)), CTX)
    assert plan.patch == {"tags": {"team": None}}


def test_set_applies_after_rename() -> None:
    image = make_image({"team": "core"})
    changes = Changes(rename_tags={"team": "owner"}, set_tags={"team": "x", "owner": "y"})
    plan = plan_changes(image, changes, CTX)
    assert plan.patch == {"tags": {"owner": "y", "team": "x"}}


# --- replace_tags --------------------------------------------------------------------------


def test_replace_tags_sets_the_exact_writable_set() -> None:
    image = make_image({"a": "1", "b": "2", "c": "3"}, read_only={"ro": "x"})
    plan = plan_changes(image, Changes(replace_tags={"a": "1", "b": "9", "d": "4"}), CTX)
    assert plan.patch == {"tags": {"c": None, "b": "9", "d": "4"}}


def test_replace_tags_with_read_only_same_value_is_fine() -> None:
    image = make_image({"a": "1"}, read_only={"ro": "x"})
    plan = plan_changes(image, Changes(replace_tags={"ro": "x"}), CTX)
    assert plan.patch == {"tags": {"a": None}}


def test_replace_tags_with_read_only_other_value_is_read_only() -> None:
    image = make_image({"a": "1"}, read_only={"ro": "x"})
    plan = plan_changes(image, Changes(replace_tags={"ro": "y"}), CTX)
    assert plan.reason == "read_only"
    assert "'ro'" in (plan.detail or "")
    plan = plan_changes(image, Changes(replace_tags={"ro": "y"}), CTX, partial=True)
    assert plan.patch == {"tags": {"a": None}}
    assert plan.reason == "read_only"


def test_replace_tags_empty_removes_every_writable_tag() -> None:
    image = make_image({"a": "1"}, read_only={"ro": "x"})
    assert plan_changes(image, Changes(replace_tags={}), CTX).patch == {"tags": {"a": None}}
    image = make_image(read_only={"ro": "x"})
    assert plan_changes(image, Changes(replace_tags={}), CTX).status == "unchanged"


# --- fields --------------------------------------------------------------------------------


def test_fields_sent_when_different_or_missing() -> None:
    image = make_image()
    changes = Changes(
        set_fields={
            "ssh_key": "allow",
            "os_type": "windows",
            "hw_firmware_type": "uefi",
            "is_baremetal": False,
            "name": "{image.name}-v2",
        }
    )
    plan = plan_changes(image, changes, CTX)
    assert plan.patch == {"os_type": "windows", "hw_firmware_type": "uefi", "name": "ubuntu-22-v2"}


def test_boolean_field_is_not_equal_to_an_integer() -> None:
    image = make_image(is_baremetal=0)
    plan = plan_changes(image, Changes(set_fields={"is_baremetal": False}), CTX)
    assert plan.patch == {"is_baremetal": False}


def test_fields_and_tags_together() -> None:
    image = make_image({"env": "prod"})
    changes = Changes(set_tags={"env": "dev"}, set_fields={"ssh_key": "deny"})
    assert plan_changes(image, changes, CTX).patch == {"tags": {"env": "dev"}, "ssh_key": "deny"}


# --- conflicts: whole target or partial ----------------------------------------------------


def test_conflicts_name_every_offending_key() -> None:
    image = make_image({"team": "core", "owner": "web"}, read_only={"r1": "a", "r2": "b"})
    changes = Changes(
        set_tags={"r1": "z", "ok": "1"},
        remove_tags=("r2",),
        rename_tags={"team": "owner"},
        set_fields={"ssh_key": "deny"},
    )
    plan = plan_changes(image, changes, CTX)
    assert plan.patch is None
    assert plan.reason == "read_only"  # read_only wins over rename_conflict
    detail = plan.detail or ""
    for key in ("'r1'", "'r2'", "'owner'"):
        assert key in detail


def test_partial_drops_only_the_offending_parts() -> None:
    image = make_image({"team": "core", "owner": "web"}, read_only={"r1": "a"})
    changes = Changes(
        set_tags={"r1": "z", "ok": "1"},
        rename_tags={"team": "owner"},
        set_fields={"ssh_key": "deny"},
    )
    plan = plan_changes(image, changes, CTX, partial=True)
    assert plan.patch == {"tags": {"ok": "1"}, "ssh_key": "deny"}
    assert plan.status == "planned"
    assert plan.reason == "read_only"
    assert "'r1'" in (plan.detail or "")
    assert "'owner'" in (plan.detail or "")


def test_partial_with_nothing_left_is_the_no_op_with_its_reason() -> None:
    image = make_image({"team": "core", "owner": "web"})
    plan = plan_changes(image, Changes(rename_tags={"team": "owner"}), CTX, partial=True)
    assert plan.patch is None
    assert plan.status == "skipped"
    assert plan.reason == "rename_conflict"


# --- merge patches -------------------------------------------------------------------------


def test_apply_patch_merges_tags_and_replaces_fields() -> None:
    state = {"tags": {"a": "1", "b": "2"}, "name": "n", "ssh_key": "allow"}
    out = apply_patch(state, {"tags": {"a": None, "c": "3"}, "name": "m"})
    assert out == {"tags": {"b": "2", "c": "3"}, "name": "m", "ssh_key": "allow"}
    assert state == {"tags": {"a": "1", "b": "2"}, "name": "n", "ssh_key": "allow"}
    untouched = apply_patch(state, {"name": "m"})
    assert untouched["tags"] == state["tags"]
    assert untouched["tags"] is not state["tags"]


def test_shows() -> None:
    state = {"tags": {"a": "1"}, "name": "n", "is_baremetal": False}
    assert shows(state, {"tags": {"a": "1", "b": None}, "name": "n"})
    assert not shows(state, {"tags": {"a": "2"}})
    assert not shows(state, {"tags": {"a": None}})
    assert not shows(state, {"tags": {"z": "1"}})
    assert not shows(state, {"ssh_key": "allow"})
    assert not shows(state, {"is_baremetal": 0})
    assert shows(state, {})


def test_inverse_patch() -> None:
    before = {"tags": {"a": "1", "b": "2"}, "name": "n", "ssh_key": "allow"}
    patch = {"tags": {"a": None, "b": "3", "c": "4", "gone": None}, "name": "m", "os_type": "w"}
    inverse = inverse_patch(before, patch)
    assert inverse == {"tags": {"a": "1", "b": "2", "c": None}, "name": "n"}
    assert apply_patch(apply_patch(before, patch), inverse) == {**before, "os_type": "w"}


def test_inverse_patch_never_sends_empty_tags() -> None:
    before = {"tags": {"a": "1"}}
    assert inverse_patch(before, {"tags": {"a": "1", "z": None}}) == {}


def test_inverse_patch_tells_booleans_from_integers() -> None:
    before = {"tags": {}, "is_baremetal": False}
    assert inverse_patch(before, {"is_baremetal": 0}) == {"is_baremetal": False}
    assert inverse_patch(before, {"is_baremetal": False}) == {}



# --- cost ----------------------------------------------------------------------------------


@pytest.mark.timing
def test_planning_a_typical_image_is_cheap() -> None:
    image = make_image({"env": "prod", "team": "core", "legacy": "1", "cc": "42"}, {"ro": "x"})
    changes = Changes(
        set_tags={"managed-by": "bulk-tagger", "retagged-on": "{run.date}"},
        remove_tags=("legacy",),
        rename_tags={"team": "owner"},
        set_fields={"ssh_key": "allow"},
    )
    assert plan_changes(image, changes, CTX).patch is not None
    n = 2000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            plan_changes(image, changes, CTX)
        best = min(best, (time.perf_counter() - start) / n)
    # The brief's budget is tens of microseconds; allow a slow, shared CI machine 10x slack.
    assert best < 300e-6, f"{best * 1e6:.1f} us per plan"


# --- property tests ------------------------------------------------------------------------

KEYS = ["a", "b", "c", "d", "e"]  # what changes name (and images may hold)
PIN = "pin"  # a tag no change names: templates may depend on it
VALUES = st.sampled_from(["1", "2", "x", "v-1"])
TEMPLATES = st.sampled_from(
    ["lit", "{run.date}", "{run.id}", "{image.os_distro}", "{tags.pin}-{image.id}", "{{b}}"]
)
ENUM_FIELDS = {
    "os_type": ["linux", "windows"],
    "ssh_key": ["allow", "deny", "required"],
    "hw_firmware_type": ["bios", "uefi"],
    "hw_machine_type": ["pc", "q35", "i440"],
}


@st.composite
def images(draw: st.DrawFn) -> Image:
    tags = draw(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5))
    read_only = draw(st.sets(st.sampled_from(KEYS)))
    pin_ro = draw(st.booleans())
    tags[PIN] = draw(VALUES)
    fields: dict[str, Any] = {}
    for name, allowed in ENUM_FIELDS.items():
        value = draw(st.one_of(st.none(), st.just("<missing>"), st.sampled_from(allowed)))
        if value != "<missing>":
            fields[name] = value
    if draw(st.booleans()):
        fields["is_baremetal"] = draw(st.booleans())
    fields["name"] = draw(st.sampled_from(["n1", "n2", "lit"]))
    writable = {k: v for k, v in tags.items() if k not in read_only and not (k == PIN and pin_ro)}
    ro = {k: v for k, v in tags.items() if k not in writable}
    return make_image(writable, ro, **fields)


@st.composite
def changes(draw: st.DrawFn, *, replace: bool | None = None) -> Changes:
    keys = st.sampled_from(KEYS)
    fields: dict[str, str | bool] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                **{name: st.sampled_from(allowed) for name, allowed in ENUM_FIELDS.items()},
                "is_baremetal": st.booleans(),
                "name": st.sampled_from(["n1", "lit", "{image.os_distro}-{run.id}"]),
            },
        )
    )
    if replace if replace is not None else draw(st.booleans()):
        return Changes(
            replace_tags=draw(st.dictionaries(keys, TEMPLATES, max_size=4)), set_fields=fields
        )
    return Changes(
        set_tags=draw(st.dictionaries(keys, TEMPLATES, max_size=3)),
        remove_tags=tuple(draw(st.lists(keys, max_size=3, unique=True))),
        rename_tags=draw(st.dictionaries(keys, keys, max_size=3)),
        set_fields=fields,
    )


patches = st.fixed_dictionaries(
    {},
    optional={
        "tags": st.dictionaries(
            st.sampled_from([*KEYS, PIN]), st.one_of(st.none(), VALUES), min_size=1, max_size=4
        ),
        "name": st.sampled_from(["n1", "n9"]),
        "ssh_key": st.sampled_from(["allow", "deny"]),
        "is_baremetal": st.booleans(),
    },
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_well_formed(plan: Plan, image: Image) -> None:
    if plan.patch is None:
        assert plan.reason in ("unchanged", "read_only", "rename_conflict", "template")
        assert plan.detail
        return
    assert plan.patch, "a planned patch is never empty"
    if "tags" in plan.patch:
        tags = plan.patch["tags"]
        assert isinstance(tags, dict)
        assert tags, "never an empty tags object"
        assert not (set(tags) & image.read_only), "never a key for a read-only tag"
        for key, value in tags.items():
            if value is None:
                assert key in image.tags, "never removes a tag that is not there"
            else:
                assert image.tags.get(key) != value, "never sends a tag already so"
    for name, value in plan.patch.items():
        if name != "tags":
            assert image.raw.get(name, object()) != value or (
                isinstance(value, bool) is not isinstance(image.raw.get(name), bool)
            )


@PROPS
@given(images(), changes(), st.booleans())
def test_property_plans_are_well_formed(image: Image, change: Changes, partial: bool) -> None:
    plan = plan_changes(image, change, CTX, partial=partial)
    assert_well_formed(plan, image)
    if not partial and plan.patch is not None:
        assert plan.reason is None


@PROPS
@given(images(), changes(), st.booleans())
def test_property_applying_then_planning_again_is_unchanged(
    image: Image, change: Changes, partial: bool
) -> None:
    # Renames the job file rejects (chains, swaps, several onto one key, a key also set or
    # removed) are not idempotent by nature: keep the ones it lets through.
    named = set(change.set_tags) | set(change.remove_tags)
    renames: dict[str, str] = {}
    for old, new in change.rename_tags.items():
        chained = new == old or new in change.rename_tags or new in renames.values()
        if not chained and old not in named and new not in named:
            renames[old] = new
    change = Changes(
        set_tags=change.set_tags,
        remove_tags=change.remove_tags,
        rename_tags=renames,
        replace_tags=change.replace_tags,
        set_fields=change.set_fields,
    )
    first = plan_changes(image, change, CTX, partial=partial)
    if first.patch is None or PIN in first.patch.get("tags", {}):
        return  # nothing applied, or templates ({tags.pin}) depend on a changed tag
    updated = after(image, first.patch)
    assert shows(updated.state(), first.patch)
    second = plan_changes(updated, change, CTX, partial=partial)
    assert_well_formed(second, updated)
    if first.reason is None:  # no conflict left anything out
        assert second.patch is None, (first, second)
        assert second.status == "unchanged"
    else:
        # Dropped parts stay dropped; what was sent is not sent again.
        assert second.status in ("planned", "skipped")
        for key, value in (second.patch or {}).get("tags", {}).items():
            assert first.patch.get("tags", {}).get(key, object()) != value


@PROPS
@given(images(), changes(replace=True))
def test_property_replace_leaves_exactly_the_wanted_writable_tags(
    image: Image, change: Changes
) -> None:
    plan = plan_changes(image, change, CTX)
    if plan.status != "planned":
        return
    assert change.replace_tags is not None
    final = after(image, plan.patch or {})
    writable = {k: v for k, v in final.tags.items() if k not in image.read_only}
    wanted = {
        k: render(v, image, CTX) for k, v in change.replace_tags.items() if k not in image.read_only
    }
    assert writable == wanted


@PROPS
@given(images(), st.one_of(patches, changes()))
def test_property_inverse_restores_writable_tags_and_fields(
    image: Image, patch_or_changes: dict[str, Any] | Changes
) -> None:
    before = image.state()
    if isinstance(patch_or_changes, Changes):
        plan = plan_changes(image, patch_or_changes, CTX, partial=True)
        if plan.patch is None:
            return
        patch = plan.patch
    else:
        patch = patch_or_changes
    inverse = inverse_patch(before, patch)
    assert inverse.get("tags", "absent") not in (None, {})
    restored = apply_patch(apply_patch(before, patch), inverse)
    assert restored["tags"] == before["tags"]
    for name, value in before.items():
        if name != "tags" and value is not None:
            assert restored[name] == value
            assert isinstance(restored[name], bool) is isinstance(value, bool)
    assert shows(restored, inverse)


@PROPS
@given(images(), st.one_of(patches, changes()))
def test_property_applied_patch_shows(
    image: Image, patch_or_changes: dict[str, Any] | Changes
) -> None:
    state = image.state()
    if isinstance(patch_or_changes, Changes):
        patch = plan_changes(image, patch_or_changes, CTX, partial=True).patch
        if patch is None:
            return
    else:
        patch = patch_or_changes
    assert shows(apply_patch(state, patch), patch)
    # A planned patch is never shown by the state it was planned from (it would be a no-op).
    if isinstance(patch_or_changes, Changes):
        assert not shows(state, patch)

"""Templates: one grammar, checked for the job file (``check``) and rendered for plans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import make_image
from worker.models import IMAGE_FIELDS, Image, RunContext
from worker.templates import (
    TemplateError,
    TemplateGap,
    bool_from_text,
    check,
    render,
    sample,
)

CTX = RunContext(run_id="run-42", run_date="2024-05-06")


# --- render --------------------------------------------------------------------------------


def test_render_fills_every_kind_of_placeholder() -> None:
    image = make_image({"team": "core"})
    text = "{image.name}/{image.os_distro}-{tags.team}@{run.date}#{run.id}"
    assert render(text, image, CTX) == "ubuntu-22/ubuntu-core@2024-05-06#run-42"


def test_render_formats_numbers_and_booleans_like_json() -> None:
    image = make_image(is_baremetal=True)
    assert render("{image.min_disk}-{image.is_baremetal}", image, CTX) == "3-true"


def test_render_literal_and_escaped_braces() -> None:
    image = make_image()
    assert render("plain", image, CTX) == "plain"
    assert render("{{x}}-{image.name}", image, CTX) == "{x}-ubuntu-22"
    assert render("{{{image.name}}}", image, CTX) == "{ubuntu-22}"


def test_image_ids_fall_back_to_the_image_attributes() -> None:
    image = Image.from_api({"id": "i-9", "name": "n", "tags": []}, project_id=5, region_id=6)
    assert render("{image.project_id}/{image.region_id}/{image.id}", image, CTX) == "5/6/i-9"


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{image.description}", "'description' is missing"),
        ("{image.architecture}", "'architecture' is null"),
        ("{image.region_id}{image.status}", "'status' is missing"),
        ("{tags.owner}", "no tag 'owner'"),
        ("{image.nmae}", "no field 'nmae'"),
        ("{run.when}", "unknown template"),
        ("{name}", "unknown template"),
        ("{image.}", "unknown template"),
        ("a{image.name", "unmatched '{'"),
        ("a}b", "unmatched '}'"),
    ],
)
def test_render_gap_says_what_is_missing(template: str, words: str) -> None:
    image = make_image(architecture=None)
    with pytest.raises(TemplateGap, match=words.replace("{", r"\{").replace(".", r"\.")):
        render(template, image, CTX)


def test_a_list_field_is_a_gap() -> None:
    image = make_image(gpu_driver=["a", "b"])
    with pytest.raises(TemplateGap, match="not a single value"):
        render("{image.gpu_driver}", image, CTX)


# --- check ---------------------------------------------------------------------------------


def test_check_lists_the_placeholders() -> None:
    assert check("plain") == []
    assert check("{image.name}-{tags.k8s:cluster}-{{x}}-{run.id}") == [
        "image.name",
        "tags.k8s:cluster",
        "run.id",
    ]


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        ("{image.nmae}", "an image has no field 'nmae'", "did you mean {image.name}?"),
        ("{image.OS_TYPE}", "no field 'OS_TYPE'", "did you mean {image.os_type}?"),
        ("{image.tags}", "tags are a list", "{tags.<key>}"),
        ("{image.zzz}", "no field 'zzz'", "os_distro"),
        ("{image.a.b}", "no field 'a.b'", None),
        ("{run.dat}", "unknown template {run.dat}", "did you mean {run.date}?"),
        ("{run.time}", "unknown template {run.time}", None),
        ("{tag.owner}", "unknown template {tag.owner}", "did you mean {tags.owner}?"),
        ("{name}", "unknown template {name}", "did you mean {image.name}?"),
        ("{tags.}", "unknown template {tags.}", None),
        ("{tags.a=b}", "tag key must not contain", None),
        ("{}", "unknown template {}", None),
        ("x{image.name", "unmatched '{' at position 1", "write {{ for a literal brace"),
        ("{a{image.name}", "unmatched '{' at position 0", None),
        ("a}b", "unmatched '}' at position 1", "write }} for a literal brace"),
    ],
)
def test_check_refuses_with_a_hint(text: str, message: str, hint: str | None) -> None:
    with pytest.raises(TemplateError) as err:
        check(text)
    assert message in err.value.message
    if hint is not None:
        assert err.value.hint is not None and hint in err.value.hint


def test_every_image_field_checks() -> None:
    for name in IMAGE_FIELDS:
        assert check(f"{{image.{name}}}") == [f"image.{name}"]


def test_sample_keeps_the_literal_parts() -> None:
    assert sample("v-{image.name}-{{x}}") == "v-x-{x}"
    assert sample("no braces") == "no braces"


# One parser: what check accepts renders, and what it refuses render refuses with its message.
_PIECES = st.sampled_from(
    ["{", "}", "{{", "}}", "{image.name}", "{image.nmae}", "{tags.team}", "{run.date}",
     "{run.id}", "{run.x}", "a", ".", "é", "image", "tags"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(_PIECES, max_size=8).map("".join))
def test_check_and_render_agree(text: str) -> None:
    image = make_image({"team": "core"})
    try:
        check(text)
    except TemplateError as err:
        with pytest.raises(TemplateGap) as gap:
            render(text, image, CTX)
        assert str(gap.value) == err.message
        return
    fields = check(text)
    values = {"image.name": "ubuntu-22", "tags.team": "core", "run.date": "2024-05-06",
              "run.id": "run-42"}  # fmt: skip
    if not set(fields) <= set(values):  # a tag the image does not have ({tags.a})
        with pytest.raises(TemplateGap, match="no tag"):
            render(text, image, CTX)
        return
    pieces = sample(text, fill="\0").split("\0")
    filled = zip(fields, pieces[1:], strict=True)
    expected = pieces[0] + "".join(values[f] + rest for f, rest in filled)
    assert render(text, image, CTX) == expected


# --- is_baremetal as text ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        (True, True), (False, False), ("true", True), ("TRUE", True), ("yes", True),
        ("1", True), (" no ", False), ("0", False), ("False", False), ("maybe", None),
        ("", None), (1, None), (None, None),
    ],
)  # fmt: skip
def test_bool_from_text_is_the_one_rule(value: object, flag: bool | None) -> None:
    assert bool_from_text(value) is flag

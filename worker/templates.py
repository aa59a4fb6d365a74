"""Templates: the one grammar of placeholders, checked for the job file and rendered for plans.

Tag values (``set_tags``, ``replace_tags``, a row's tags) and the string fields of ``set`` may
hold placeholders; tag keys never do.

``{image.<field>}``  a top-level field of the image as the API returned it: one of
                     ``worker.models.IMAGE_FIELDS`` (the fields the API's reference page lists).
                     Strings as they are, numbers as written, booleans as ``true``/``false``.
                     A missing or null field, or one holding a list or an object, is a gap.
``{tags.<key>}``     the value of a *current* tag (before the plan's changes); a gap if absent.
``{run.date}``       the run's UTC date, ``YYYY-MM-DD``.      ``{run.id}``: the run's id.

A placeholder may name a default after ``|``: ``{tags.owner|unknown}``, ``{image.os_version|
none}`` render the text after the bar where the tag or field is missing (or null, or not a
single value) instead of a gap. The default is literal text (no braces, no bar).

Text around placeholders is literal; ``{{`` and ``}}`` stand for literal braces. Any other
``{...}``, an unmatched ``{`` or ``}`` is an error.

``check(text)``   for the job file: the placeholders, or ``TemplateError`` (message and hint).
``render(text, image, ctx)``  for plans: the filled-in text, or ``TemplateGap``.

Both read the text through one parser, so what ``validate`` accepts is what a plan renders.
Values that are not templates (what undo restores, ``Changes.literal``) never come here.

``bool_from_text`` is the one rule for ``is_baremetal`` given as text (a CSV cell, a string in
the job file): ``true``/``yes``/``1`` and ``false``/``no``/``0``, any case.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from worker.models import IMAGE_FIELDS, Image, RunContext, tag_problem
from worker.safety import excerpt, has_control

__all__ = [
    "BOOL_TEXT_FORMS",
    "TemplateError",
    "TemplateGap",
    "bool_from_text",
    "check",
    "is_template",
    "render",
    "sample",
]

FORMS = "{image.<field>}, {tags.<key>}, {run.date} or {run.id}"
_RUN_NAMES = ("date", "id")
_IMAGE_FIELDS = frozenset(IMAGE_FIELDS)


class TemplateError(ValueError):
    """A template that breaks the grammar or names what no image or run has."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class TemplateGap(Exception):
    """A template names something this image does not have, or renders an invalid value."""


# A compiled template: literal text (kind None) and placeholders (kind "image"/"tags"/"run"),
# each with its default (None: a gap where the value is missing).
_Part = tuple[str | None, str, str | None]


@dataclass(frozen=True, slots=True)
class _Compiled:
    parts: tuple[_Part, ...]
    error: TemplateError | None


def _placeholder_error(body: str) -> TemplateError | None:
    kind, dot, name = body.partition(".")
    if not dot or not name:
        return TemplateError(f"unknown template {{{body}}}", _kind_hint(body))
    if kind == "run":
        if name in _RUN_NAMES:
            return None
        close = difflib.get_close_matches(name, _RUN_NAMES, n=1, cutoff=0.5)
        hint = f"did you mean {{run.{close[0]}}}?" if close else "the run has {run.date}, {run.id}"
        return TemplateError(f"unknown template {{{body}}}", hint)
    if kind == "image":
        if name in _IMAGE_FIELDS:
            return None
        if name in ("tags", "tags_v2"):
            return TemplateError(
                f"{{{body}}}: an image's tags are a list, not one value",
                "write {tags.<key>} for one tag's value",
            )
        return TemplateError(f"{{{body}}}: an image has no field {name!r}", _field_hint(name))
    if kind == "tags":
        problem = tag_problem(name)
        if problem is None:
            return None
        return TemplateError(f"{{{body}}}: the tag key {problem}")
    return TemplateError(f"unknown template {{{body}}}", _kind_hint(body))


def _field_hint(name: str) -> str:
    lowered = {f.lower(): f for f in IMAGE_FIELDS}
    close = [lowered[name.lower()]] if name.lower() in lowered else []
    close = close or difflib.get_close_matches(name, IMAGE_FIELDS, n=1, cutoff=0.6)
    if close:
        return f"did you mean {{image.{close[0]}}}?"
    return f"an image's fields: {', '.join(IMAGE_FIELDS)}"


def _kind_hint(body: str) -> str:
    head, _, rest = body.partition(".")
    if head in ("tag", "tag_", "tags_", "tag_key") and rest:
        return f"did you mean {{tags.{rest}}}?"
    if head in ("images", "img") and rest:
        return f"did you mean {{image.{rest}}}?"
    if not rest and head in _IMAGE_FIELDS:
        return f"did you mean {{image.{head}}}?"
    close = difflib.get_close_matches(body, ["run.date", "run.id"], n=1, cutoff=0.6)
    if close:
        return f"did you mean {{{close[0]}}}?"
    return f"templates are {FORMS}; write {{{{ and }}}} for literal braces"


def _unmatched(token: str, at: int, text: str) -> TemplateError:
    return TemplateError(
        f"unmatched {token!r} at position {at} in {excerpt(text)}",
        f"templates are {FORMS}; write {token}{token} for a literal brace",
    )


def _parse(text: str) -> _Compiled:
    parts: list[_Part] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "{":
            if text.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = text.find("}", i + 1)
            opened = text.find("{", i + 1)
            if end < 0 or 0 <= opened < end:
                return _Compiled((), _unmatched("{", i, text))
            body, bar, default = text[i + 1 : end].partition("|")
            error = _placeholder_error(body)
            if error is None and "|" in default:
                error = TemplateError(
                    f"{{{body}|{default}}}: a default holds no '|'", "one default: {tags.k|x}")
            if error is not None:
                return _Compiled((), error)
            if literal:
                parts.append((None, "".join(literal), None))
                literal = []
            kind, _, name = body.partition(".")
            parts.append((kind, name, default if bar else None))
            i = end + 1
        elif ch == "}":
            if text.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            return _Compiled((), _unmatched("}", i, text))
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append((None, "".join(literal), None))
    return _Compiled(tuple(parts), None)


@functools.lru_cache(maxsize=4096)
def _compile(text: str) -> _Compiled:
    # Jobs hold a handful of distinct templates, rendered once per image: parse each once.
    return _parse(text)


def is_template(text: str) -> bool:
    """True when ``text`` holds a brace: only then is it parsed (plain text is as it is)."""
    return "{" in text or "}" in text


def check(text: str) -> list[str]:
    """The placeholders of ``text`` (``["image.name", "run.date"]``), in order.

    Raises ``TemplateError`` (a message and a hint) for a brace that opens no valid
    placeholder, or a placeholder naming an image field, run value or tag key there is none of.
    """
    if not is_template(text):
        return []
    compiled = _compile(text)
    if compiled.error is not None:
        raise compiled.error
    return [f"{kind}.{name}" for kind, name, _ in compiled.parts if kind is not None]


def sample(text: str, fill: str = "x") -> str:
    """``text`` as rendered with every placeholder filled by ``fill``: its literal parts, for
    checking them as the API would check the result (``text`` must pass ``check``)."""
    if not is_template(text):
        return text
    return "".join(fill if kind is not None else name for kind, name, _ in _compile(text).parts)


def _image_field(image: Image, name: str) -> str:
    raw = image.raw
    value = raw.get(name)
    if value is None and name in ("id", "project_id", "region_id") and name not in raw:
        value = getattr(image, name)
    if value is None:
        missing = "is null" if name in raw else "is missing"
        raise TemplateGap(f"{{image.{name}}}: the image's field {name!r} {missing}")
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise TemplateGap(
        f"{{image.{name}}}: the image's field {name!r} holds a {type(value).__name__}, "
        "not a single value"
    )


def render(text: str, image: Image, ctx: RunContext) -> str:
    """``text`` with its placeholders filled from ``image`` and ``ctx``; raises TemplateGap."""
    if not is_template(text):
        return text
    compiled = _compile(text)
    if compiled.error is not None:
        raise TemplateGap(compiled.error.message)
    out: list[str] = []
    for kind, name, default in compiled.parts:
        if kind is None:
            out.append(name)
        elif kind == "tags":
            tag = image.tags.get(name)
            if tag is None:
                if default is None:
                    raise TemplateGap(f"{{tags.{name}}}: the image has no tag {name!r}")
                tag = default
            out.append(tag)
        elif kind == "image":
            try:
                out.append(_image_field(image, name))
            except TemplateGap:
                if default is None:
                    raise
                out.append(default)
        else:
            out.append(ctx.run_date if name == "date" else ctx.run_id)
    value = "".join(out)
    if has_control(value):  # copied from the image: never sent on (README: threat model)
        raise TemplateGap(f"{excerpt(text)} renders {excerpt(value)},"
                          " which holds a control character")
    return value


_BOOL_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
BOOL_TEXT_FORMS = "true/false, yes/no or 1/0"


def bool_from_text(value: object) -> bool | None:
    """``is_baremetal``'s value: a boolean as it is, text by the one rule (``true``/``yes``/
    ``1``, ``false``/``no``/``0``, any case, spaces around ignored); None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _BOOL_TEXT.get(value.strip().lower())
    return None

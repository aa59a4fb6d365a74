"""The plan stage: (current image, changes, run context) -> a merge-patch body, or a no-op.

Pure functions, no I/O. The pool calls ``plan_changes`` once per image (and again after a task
lock, on the re-read image); undo builds its patch with ``inverse_patch`` and checks with
``shows`` that an image still shows what a run set.

Templates
    Tag values (``set_tags``, ``replace_tags``) and string fields (``set``) may hold
    placeholders (worker.templates: the grammar, ``render``); tag keys never do. Changes marked
    ``literal`` (undo's, ``Changes.from_patch``) are sent as they are: never rendered, never
    checked again (they are values an image held).

    A rendered tag value must still be a valid tag value (``worker.models.tag_problem``); a
    rendered enum field must be one of its allowed values; a rendered ``name`` must not be
    empty. A gap or any of these failing fails the target: status ``failed``, reason
    ``template``, a detail naming the change and why.

Tag changes (evaluated on a working copy of the current tags, in this order)
    1. ``replace_tags`` {k: v}: the exact set of writable tags. Every current writable key not
       in it is removed; every key in it is set. A key in it that is read-only is fine when it
       already holds that value, a ``read_only`` conflict otherwise. (The job file does not let
       ``replace_tags`` be combined with the three below; were it, they would apply after it.)
    2. ``rename_tags`` {old: new}, one after another in the job's order: ``old`` absent ->
       nothing; ``old`` or ``new`` read-only -> ``read_only``; ``new`` present with another
       value -> ``rename_conflict``; ``new`` present with the same value -> ``old`` is removed;
       otherwise ``new`` takes ``old``'s value and ``old`` is removed.
    3. ``remove_tags`` [k]: present and writable -> removed; read-only -> ``read_only``;
       absent -> nothing.
    4. ``set_tags`` {k: v}: k takes the rendered v; a read-only k is fine when it already holds
       v, a ``read_only`` conflict otherwise.
    5. ``add_tags`` {k: v}: k takes the rendered v only where the image has no k (after the
       steps above); a k that holds another value keeps it, never a conflict (``kubectl
       label`` without ``--overwrite``). An image where nothing else changes is
       ``unchanged``, its detail naming each key it kept.
    When several changes name one key the later step wins: renames, then removes, then sets
    (a set wins over a remove of the same key). The patch's ``tags`` is then the difference
    between the working copy and the current tags: a key whose final value equals its current
    one is not sent, a key that is gone is sent as null, so ``tags`` is never null, never
    empty, and never names a read-only tag.

    The job file (worker.spec) rejects the rename combinations that are ambiguous and not
    idempotent: chains and swaps (a key both renamed and a new name), several keys renamed onto
    one, and a rename whose keys are also set or removed. Were they to reach here, the rules
    above still decide them deterministically, but a second run would change the image again
    (e.g. after ``{c: a, b: c}`` moved ``b`` to ``c``, the next run moves ``c`` to ``a``).

Fields (``set``: name, os_type, ssh_key, hw_firmware_type, hw_machine_type, is_baremetal)
    Sent when different from the image's value; a missing field counts as different.
    ``is_baremetal`` must be a boolean, or text by ``templates.bool_from_text``'s one rule.

Outcome (``Plan``)
    ``planned``    a patch to send.
    ``unchanged``  nothing to send: the image already shows every change.
    ``skipped``    a ``read_only`` or ``rename_conflict`` conflict. By default any conflict makes
                   the whole target a no-op (``detail`` names every offending key). With
                   ``partial=True`` only the offending changes are dropped and the rest is
                   planned: the Plan then carries a patch *and* the reason/detail of what was
                   left out (its status is ``planned``); if nothing remains it is the no-op.
                   Where both kinds occur the reason is ``read_only``.
    ``failed``     reason ``template``: a template gap or an invalid rendered value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.models import ENUMS, SETTABLE_FIELDS, Changes, Image, RunContext, tag_problem
from worker.templates import BOOL_TEXT_FORMS, TemplateGap, bool_from_text, render

__all__ = [
    "Plan",
    "apply_patch",
    "inverse_patch",
    "plan_changes",
    "shows",
]

READ_ONLY = "read_only"
RENAME_CONFLICT = "rename_conflict"
UNCHANGED = "unchanged"
TEMPLATE = "template"

_STATUS_OF_REASON = {
    UNCHANGED: "unchanged",
    READ_ONLY: "skipped",
    RENAME_CONFLICT: "skipped",
    TEMPLATE: "failed",
}
_SETTABLE = frozenset(SETTABLE_FIELDS)


# not frozen (made once a target, never changed): a frozen dataclass's __init__ costs
# about three times as much, and this is on every target's path
@dataclass(slots=True)
class Plan:
    """What to send to one image: a merge-patch body, or None with the reason it is a no-op.

    ``reason`` is ``unchanged``, ``read_only``, ``rename_conflict`` or ``template``; ``detail``
    says in words which tag, field or template and why. See the module docstring.
    """

    patch: dict[str, Any] | None
    reason: str | None = None
    detail: str | None = None

    @property
    def status(self) -> str:
        """``planned`` (a patch), ``unchanged``, ``skipped`` (a conflict) or ``failed``."""
        if self.patch is not None:
            return "planned"
        return _STATUS_OF_REASON.get(self.reason or UNCHANGED, "failed")


# --- rendering ---------------------------------------------------------------------------


def _render_tag_values(
    what: str, values: Mapping[str, str], image: Image, ctx: RunContext
) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, template in values.items():
        try:
            value = render(template, image, ctx)
        except TemplateGap as gap:
            raise TemplateGap(f"{what} {key!r}: {gap}") from None
        problem = tag_problem(value)
        if problem is not None:
            raise TemplateGap(f"{what} {key!r}: {template!r} renders {value!r}, which {problem}")
        out[key] = value
    return out


def _render_field(name: str, template: object, image: Image, ctx: RunContext) -> str | bool:
    if name not in _SETTABLE:
        raise TemplateGap(f"set {name!r}: not a settable field ({', '.join(SETTABLE_FIELDS)})")
    if name == "is_baremetal":
        flag = bool_from_text(template)
        if flag is None:
            raise TemplateGap(f"set 'is_baremetal': {template!r} is not {BOOL_TEXT_FORMS}")
        return flag
    if not isinstance(template, str):
        raise TemplateGap(f"set {name!r}: {template!r} is not a string")
    try:
        value = render(template, image, ctx)
    except TemplateGap as gap:
        raise TemplateGap(f"set {name!r}: {gap}") from None
    if value is not template:
        allowed = ENUMS.get(name)
        if allowed is not None and value not in allowed:
            raise TemplateGap(
                f"set {name!r}: {template!r} renders {value!r}, not one of {', '.join(allowed)}"
            )
        if not value:
            raise TemplateGap(f"set {name!r}: {template!r} renders an empty value")
    return value


# --- planning ----------------------------------------------------------------------------

_MISSING: Any = object()


def _same(a: object, b: object) -> bool:
    """Equal, and not merely because True == 1."""
    return a == b and isinstance(a, bool) is isinstance(b, bool)


def plan_changes(image: Image, changes: Changes, ctx: RunContext, *, partial: bool = False) -> Plan:
    """The patch that makes ``image`` show ``changes``, or a no-op with its reason.

    Rules, order and reasons: see the module docstring. ``partial=True`` drops only the
    conflicting changes instead of the whole target.
    """
    replace = changes.replace_tags
    has_tag_changes = bool(
        replace is not None or changes.set_tags or changes.remove_tags or changes.rename_tags
        or changes.add_tags
    )
    sets: Mapping[str, str]
    adds: Mapping[str, str]
    replace_values: Mapping[str, str] | None
    fields: Mapping[str, str | bool]
    kept: list[str] = []
    if changes.literal:
        sets, replace_values, fields = changes.set_tags, replace, changes.set_fields
        adds = changes.add_tags
    else:
        try:
            sets = _render_tag_values("set_tags", changes.set_tags, image, ctx)
            adds = _render_tag_values(
                "add_tags", {k: v for k, v in changes.add_tags.items() if k not in image.tags},
                image, ctx,
            ) if changes.add_tags else changes.add_tags
            replace_values = (
                _render_tag_values("replace_tags", replace, image, ctx)
                if replace is not None
                else None
            )
            fields = {
                name: _render_field(name, value, image, ctx)
                for name, value in changes.set_fields.items()
            }
        except TemplateGap as gap:
            return Plan(None, TEMPLATE, str(gap))

    patch: dict[str, Any] = {}
    problems: list[str] = []
    read_only_hit = False
    if has_tag_changes:
        current = image.tags
        ro = image.read_only
        work = dict(current)

        if replace_values is not None:
            for key in current:
                if key not in ro and key not in replace_values:
                    del work[key]
            for key, value in replace_values.items():
                if key in ro:
                    if current[key] != value:
                        read_only_hit = True
                        problems.append(
                            f"tag {key!r} is read-only (replace_tags wants {value!r}, "
                            f"it holds {current[key]!r})"
                        )
                else:
                    work[key] = value

        for old, new in changes.rename_tags.items():
            if old not in work or old == new:
                continue
            if old in ro or new in ro:
                read_only_hit = True
                which = old if old in ro else new
                problems.append(f"tag {which!r} is read-only (rename_tags {old!r} -> {new!r})")
                continue
            value = work.pop(old)
            held = work.get(new)
            if held is None:
                work[new] = value
            elif held != value:
                work[old] = value  # put it back: this rename does not happen
                problems.append(
                    f"rename_tags {old!r} -> {new!r}: {new!r} already holds {held!r}, not {value!r}"
                )

        for key in changes.remove_tags:
            if key in ro:
                read_only_hit = True
                problems.append(f"tag {key!r} is read-only (remove_tags)")
            else:
                work.pop(key, None)

        for key, value in sets.items():
            if key in ro:
                if current[key] != value:
                    read_only_hit = True
                    problems.append(
                        f"tag {key!r} is read-only (set_tags wants {value!r}, "
                        f"it holds {current[key]!r})"
                    )
            else:
                work[key] = value

        for key, template in changes.add_tags.items():
            value = adds.get(key, template)  # rendered where the image has no such key
            held = work.get(key)
            if held is None:
                work[key] = value
            elif held != value:
                kept.append(f"add_tags {key!r}: the image holds {held!r}, kept")

        if problems and not partial:
            return Plan(None, READ_ONLY if read_only_hit else RENAME_CONFLICT, "; ".join(problems))

        tags_patch: dict[str, str | None] = {}
        for key in current:
            if key not in work:
                tags_patch[key] = None
        for key, value in work.items():
            if current.get(key) != value:
                tags_patch[key] = value
        if tags_patch:
            patch["tags"] = tags_patch

    raw = image.raw
    for name, field_value in fields.items():
        if not _same(raw.get(name, _MISSING), field_value):
            patch[name] = field_value

    if problems:
        reason = READ_ONLY if read_only_hit else RENAME_CONFLICT
        return Plan(patch or None, reason, "; ".join(problems))
    if not patch:
        detail = "; ".join(kept) if kept else "the image already shows every change"
        return Plan(None, UNCHANGED, detail)
    return Plan(patch)


# --- merge patches (RFC 7386) on Image.state()-shaped dicts -------------------------------


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def apply_patch(state: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``state`` with ``patch`` applied as RFC 7386 says; a new dict, ``state`` is not changed.

    ``patch["tags"]`` merges into ``state["tags"]`` (a null value removes that tag); any other
    key replaces the field (null removes it).
    """
    out: dict[str, Any] = _merge(state, patch)
    tags = out.get("tags")
    if "tags" not in patch and isinstance(tags, dict):
        out["tags"] = dict(tags)  # never share the caller's tags dict
    return out


def _shows(target: Any, patch: Any) -> bool:
    # ``type(x) is dict`` first: the usual case, and an ABC isinstance costs ten times more
    if type(patch) is not dict and not isinstance(patch, Mapping):
        return _same(target, patch)
    if type(target) is not dict and not isinstance(target, Mapping):
        target = {}
    for key, value in patch.items():
        if value is None:
            if target.get(key) is not None:
                return False
        elif not _shows(target.get(key), value):
            return False
    return True


def shows(state: dict[str, Any], patch: dict[str, Any]) -> bool:
    """True when ``state`` already reflects ``patch``: every tag it sets holds that value,
    every tag it removes is absent, every field it sets is equal (a null counts as absent).

    Checks a PATCH response, and lets undo see that an image still shows what a run set.
    """
    return bool(_shows(state, patch))


def inverse_patch(before: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The patch that restores, from ``apply_patch(before, patch)``, what ``patch`` touched.

    A tag it set goes back to its old value, or to null where it did not exist; a tag it
    removed comes back; a field goes back to its old value. Names only what ``patch`` actually
    changed, never ``"tags": null`` nor an empty ``tags``. A field that ``before`` did not have
    (or held as null) cannot be unset through the API and is left out.
    """
    out: dict[str, Any] = {}
    ptags = patch.get("tags")
    if isinstance(ptags, Mapping):
        btags = before.get("tags") or {}
        inverse: dict[str, str | None] = {}
        for key, value in ptags.items():
            old = btags.get(key)
            if old is None:
                if value is not None:
                    inverse[key] = None
            elif old != value:
                inverse[key] = old
        if inverse:
            out["tags"] = inverse
    for key, value in patch.items():
        if key == "tags":
            continue
        old = before.get(key)
        if old is not None and not _same(old, value):
            out[key] = old
    return out

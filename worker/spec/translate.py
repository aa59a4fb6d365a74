"""pydantic's validation errors in the words of the job file: message, hint, file, line and the
field as a dotted path (``targets[1].query.visibility``)."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from worker.errors import JobError
from worker.spec.checks import Path_, _did_you_mean, _dotted, _kind, _Problem, _short
from worker.spec.models import (
    ChangesSpec,
    FileSelector,
    Job,
    Options,
    Query,
    QuerySelector,
    SetFields,
)
from worker.spec.source import Lines

_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Job,
    ("targets", "#", "query"): QuerySelector,
    ("targets", "#", "file"): FileSelector,
    ("targets", "#", "query", "query"): Query,
    ("changes",): ChangesSpec,
    ("changes", "set"): SetFields,
    ("options",): Options,
}
_SECTION_LABELS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("at the top level", Job),
    ("under changes:", ChangesSpec),
    ("under options:", Options),
    ("under a target's query:", Query),
    ("under changes: set:", SetFields),
    ("in a target (- query: or - file:)", FileSelector),
)
#: Where each known key belongs: "concurrency belongs under options:".
_HOME: dict[str, list[str]] = {}
for _label, _model in _SECTION_LABELS:
    for _name in _model.model_fields:
        _HOME.setdefault(_name, []).append(_label)


def _unknown_key_hint(raw_loc: Path_) -> str | None:
    pattern = tuple("#" if isinstance(p, int) else p for p in raw_loc[:-1])
    model = _SECTIONS.get(pattern)
    key = raw_loc[-1]
    if model is None:
        return None
    allowed = list(model.model_fields)
    guess = _did_you_mean(key, allowed)
    if guess:
        return guess
    if isinstance(key, str) and key in _HOME:
        return f"{key} belongs " + " or ".join(_HOME[key])
    return "allowed here: " + ", ".join(allowed)


def _describe(err: Any, raw_loc: Path_) -> tuple[str, str | None, Path_]:
    """(message, hint, extra path) for one pydantic error."""
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        exc = ctx.get("error")
        if isinstance(exc, _Problem):
            return exc.message, exc.hint, exc.at
        return str(err["msg"]).removeprefix("Value error, "), None, ()
    if kind == "missing":
        field = raw_loc[-1] if raw_loc else ""
        hints = {
            "name": "1 to 63 characters of a-z, 0-9 and '-'",
            "targets": "list one or more selectors: - query: {...} or - file: rows.csv",
        }
        return "is required", hints.get(str(field)), ()
    if kind == "extra_forbidden":
        return "unknown key", _unknown_key_hint(raw_loc), ()
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        if isinstance(value, dict) and "query" in value and "file" in value:
            return "a target has either query: or file:, not both", "make them two targets", ()
        hint = None
        if isinstance(value, dict):
            hint = next(filter(None, (_did_you_mean(k, ["query", "file"]) for k in value)), None)
        return f"a target must be a mapping with query: or file:, not {_kind(value)}", hint, ()
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        hint = _did_you_mean(value, expected.split(", "))
        return f"must be one of {expected}; got {_short(value)}", hint, ()
    if kind == "string_type":
        hint = f'quote it: "{value}"' if isinstance(value, (int, float)) else None
        return f"must be text, not {_kind(value)}", hint, ()
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return f"must be a whole number, not {_kind(value)}", None, ()
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, not {_kind(value)}", None, ()
    if kind == "finite_number":
        return "must be a finite number", None, ()
    if kind == "bool_type":
        return f"must be true or false, not {_kind(value)}", None, ()
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping (key: value), not {_kind(value)}", None, ()
    if kind == "list_type":
        return f"must be a list, not {_kind(value)}", None, ()
    if kind in ("too_short", "string_too_short"):
        return "must not be empty", None, ()
    if kind in ("too_long", "string_too_long"):
        return f"is too long (at most {ctx.get('max_length')})", None, ()
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}, not {_short(value)}", None, ()
    return str(err["msg"]).replace("Input should be", "should be"), None, ()


def _strip_tag(loc: Path_) -> Path_:
    """Drop the union tag pydantic puts after ``targets[i]`` and the ``[key]`` marker."""
    if len(loc) > 2 and loc[0] == "targets" and isinstance(loc[1], int):
        loc = loc[:2] + loc[3:]
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
    return loc


def _line_of(loc: Path_, lines: Lines) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


#: the most mistakes of one file an error lists (the first, then ``more``); the rest are counted
MAX_LISTED = 20


def _translate(exc: ValidationError, file: str, lines: Lines) -> JobError:
    found: list[tuple[bool, int, int, JobError]] = []
    for order, err in enumerate(exc.errors()):
        raw_loc: Path_ = tuple(err["loc"])
        message, hint, extra = _describe(err, raw_loc)
        loc = _strip_tag(raw_loc) + extra
        line = _line_of(loc, lines)
        error = JobError(message, file=file, line=line, field=_dotted(loc) or None, hint=hint)
        # A missing key is reported after what is there (a misspelt key explains it better).
        found.append((err["type"] == "missing", line or 0, order, error))
    found.sort(key=lambda item: item[:3])
    first = found[0][3]
    first.more = [item[3] for item in found[1:MAX_LISTED]]
    first.unlisted = max(0, len(found) - MAX_LISTED)
    return first

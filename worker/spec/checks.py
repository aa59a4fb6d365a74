"""The checks every part of the job file shares: the problem type, tag keys and values, settable
fields, environment IDs, and the template check (worker.templates holds the grammar).

A check raises ``_Problem`` (a message, a hint, the path below the field it was given); the
callers turn it into a ``JobError`` naming file, line and field.
"""

from __future__ import annotations

import difflib
import json
import re
import reprlib
from collections.abc import Mapping
from typing import Any

from worker import templates
from worker.models import ENUMS, tag_problem

PROJECT_ENV = "GCORE_CLOUD_PROJECT_ID"
REGION_ENV = "GCORE_CLOUD_REGION_ID"
_ID_ENV = {"projects": PROJECT_ENV, "regions": REGION_ENV}

Path_ = tuple[str | int, ...]


class _Problem(ValueError):
    """A validation problem with a teaching message; ``at`` extends the field path."""

    def __init__(self, message: str, *, hint: str | None = None, at: Path_ = ()) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.at = at


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring = 2, 4, 4, 200


def _short(value: object, limit: int = 40) -> str:
    """A short repr of ``value`` (control characters escaped): bounded in time and size, even
    for a structure a YAML alias bomb expands to billions of values."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _kind(value: object) -> str:
    """A value's type in the words of a YAML/JSON user."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _did_you_mean(word: object, choices: Any) -> str | None:
    if not isinstance(word, str):
        return None
    options = [str(c) for c in choices]
    lowered = {c.lower(): c for c in options}
    if word.lower() in lowered:
        return f"did you mean {lowered[word.lower()]!r}?"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _dotted(loc: Path_) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += ("." if out else "") + part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _env_id(env: Mapping[str, str], var: str) -> int | None:
    raw = env.get(var)
    if raw is None or not raw.strip():
        return None
    if not re.fullmatch(r"[0-9]{1,18}", raw.strip()) or int(raw) <= 0:
        raise _Problem(f"{var}={_short(raw)} is not an ID (a positive whole number)")
    return int(raw)


# ---------------------------------------------------------------------------------------------
# Templates (tag values and set's text fields): the grammar is worker.templates'


def template_fields(text: str) -> list[str]:
    """The placeholders of a template (``["image.name", "run.date"]``), in order.

    Raises ``_Problem`` (a ValueError, with a hint) for a brace that opens no valid placeholder
    or a placeholder naming what an image or run does not have; ``{{``/``}}`` are literal.
    """
    try:
        return templates.check(text)
    except templates.TemplateError as exc:
        raise _Problem(exc.message, hint=exc.hint) from None


# ---------------------------------------------------------------------------------------------
# Tag and field checks

#: A fast path for the common case; equivalent to ``tag_problem(text) is None`` (re's ``\s`` is
#: ``str.isspace``), which stays the authority for every message.
_GOOD_TAG = re.compile(r"[^\s=]{1,255}")


def _check_key(key: object, what: str = "tag key") -> str:
    if isinstance(key, str) and _GOOD_TAG.fullmatch(key):
        return key
    problem = tag_problem(key)
    if problem:
        raise _Problem(f"{what} {_short(key)} {problem}")
    assert isinstance(key, str)
    return key


def _check_keys(keys: list[str]) -> list[str]:
    """A list of tag keys, each checked (an error names its index), duplicates dropped."""
    for i, key in enumerate(keys):
        try:
            _check_key(key)
        except _Problem as exc:
            raise _Problem(exc.message, at=(i,)) from None
    return list(dict.fromkeys(keys))


def _check_value(value: object, what: str = "tag value") -> str:
    """A tag value: text, templates allowed, literal parts as the API checks them."""
    if not isinstance(value, str):
        hint = f'quote it: "{value}"' if isinstance(value, (int, float)) else None
        raise _Problem(f"{what} must be text, not {_kind(value)}", hint=hint)
    if templates.is_template(value):
        template_fields(value)
        literal = templates.sample(value)
    elif _GOOD_TAG.fullmatch(value):
        return value
    else:
        literal = value
    problem = tag_problem(literal)
    if problem:
        raise _Problem(f"{what} {_short(value)} {problem}")
    return value


def _check_tag_map(value: Mapping[str, Any], *, templates: bool = True) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, val in value.items():
        try:
            _check_key(key)
            out[key] = _check_value(val) if templates else _check_key(val, "tag value")
        except _Problem as exc:
            raise _Problem(exc.message, hint=exc.hint, at=(key, *exc.at)) from None
    return out


def _check_field(name: str, value: object) -> str | bool:
    """A settable field's value, checked as the API checks it; ``is_baremetal`` may be text
    (a CSV cell, a quoted word), read by ``templates.bool_from_text``'s one rule."""
    if name == "is_baremetal":
        flag = templates.bool_from_text(value)
        if flag is None:
            raise _Problem(f"must be {templates.BOOL_TEXT_FORMS}, not {_short(value)}")
        return flag
    if not isinstance(value, str):
        raise _Problem(f"must be text, not {_kind(value)}")
    if name in ENUMS:
        if value not in ENUMS[name]:
            raise _Problem(
                f"must be one of {', '.join(ENUMS[name])}; got {_short(value)}",
                hint=_did_you_mean(value, ENUMS[name]),
            )
        return value
    if not value:
        raise _Problem("must not be empty")
    if len(value) > 255:
        raise _Problem(f"is {len(value)} characters long; at most 255 are allowed")
    if templates.is_template(value):
        template_fields(value)
    return value

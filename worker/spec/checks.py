"""The checks every part of the job file shares: the problem type, tag keys and values, settable
fields, environment IDs, and the template placeholders.

A check raises ``_Problem`` (a message, a hint, the path below the field it was given); the
callers turn it into a ``JobError`` naming file, line and field.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

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


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
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
# Templates (tag values and set.name): the placeholder grammar, its hints, rendering

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TEMPLATE_FORMS = "{image.<field>}, {tags.<key>}, {run.date} or {run.id}"


def _placeholder_problem(name: str) -> str | None:
    if name in ("run.date", "run.id"):
        return None
    head, dot, rest = name.partition(".")
    if dot and head == "image" and _IDENT.fullmatch(rest):
        return None
    if dot and head == "tags" and rest and tag_problem(rest) is None:
        return None
    return f"unknown template {{{name}}}"


def _template_hint(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in ("tag", "tag_", "tags_", "tag_key") and rest:
        return f"did you mean {{tags.{rest}}}?"
    if head in ("images", "img") and rest:
        return f"did you mean {{image.{rest}}}?"
    close = difflib.get_close_matches(name, ["run.date", "run.id"], n=1, cutoff=0.6)
    if close:
        return f"did you mean {{{close[0]}}}?"
    return f"templates are {_TEMPLATE_FORMS}"


def template_fields(text: str) -> list[str]:
    """The placeholders of a template (``["image.name", "run.date"]``), in order.

    Raises ValueError for a brace that opens no valid placeholder; ``{{``/``}}`` are literal.
    """
    fields: list[str] = []
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        name = match.group(1)
        if name is None:
            raise _Problem(
                f"unmatched {token!r} in {_short(text)}",
                hint=f"templates are {_TEMPLATE_FORMS}; write {token}{token} for a literal brace",
            )
        problem = _placeholder_problem(name)
        if problem:
            raise _Problem(problem, hint=_template_hint(name))
        fields.append(name)
    return fields


def render_template(text: str, resolve: Callable[[str], str | None]) -> str | None:
    """``text`` with each placeholder replaced by ``resolve(name)``; None if one resolves to None.

    ``name`` is ``image.<field>``, ``tags.<key>``, ``run.date`` or ``run.id``.
    """
    missing = False

    def sub(match: re.Match[str]) -> str:
        nonlocal missing
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if match.group(1) is None:  # a lone brace (load_job refuses these): kept as it is
            return token
        value = resolve(match.group(1))
        if value is None:
            missing = True
            return ""
        return value

    out = _TOKEN.sub(sub, text)
    return None if missing else out


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
    if "{" in value or "}" in value:
        template_fields(value)
        literal = _TOKEN.sub(lambda m: "x" if m.group(1) is not None else m.group(0)[0], value)
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


_TRUE = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _check_field(name: str, value: object, *, from_text: bool = False) -> str | bool:
    """A settable field's value, checked as the API checks it (CSV text when ``from_text``)."""
    if name == "is_baremetal":
        if from_text and isinstance(value, str) and value.strip().lower() in _TRUE:
            return _TRUE[value.strip().lower()]
        if isinstance(value, bool) and not from_text:
            return value
        allowed = "true/false, yes/no or 1/0" if from_text else "true or false"
        raise _Problem(f"must be {allowed}, not {_short(value)}")
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
    if "{" in value or "}" in value:
        template_fields(value)
    return value

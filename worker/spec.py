"""The job file (CONTRACT.md, "The job file"): pydantic models, and streaming selector-file readers.

Public API::

    load_job(path, *, env=None) -> Job              # YAML (.yaml/.yml) or JSON (.json), one schema
    iter_rows(job, selector, *, env=None) -> Iterator[Row]     # a FileSelector's rows, streamed
    check_selector_files(job, *, env=None) -> dict[str, int]   # rows per selector file
    template_fields(text) -> list[str]; render_template(text, resolve) -> str

Every problem is a ``worker.errors.JobError`` that names the file, the line (1-based; for CSV the
physical line, 1 = the header) and the field as a dotted path (``targets[1].query.visibility``,
``changes.set_tags.owner``), with a hint where one helps. Of several problems in a job file the
first in file order is reported (a missing key last). Nothing here touches the network.

YAML is read with YAML 1.2 core-schema scalars: only ``true``/``false`` are booleans (``no``,
``on``, ``yes`` stay text), ``12:30`` and ``2024-01-01`` stay text, ``010`` is ten. Duplicate keys
are errors; anchors, aliases and ``<<`` merge keys work.

Templates (tag values, ``set.name``): ``{image.<field>}``, ``{tags.<key>}``, ``{run.date}``,
``{run.id}``; ``{{`` and ``}}`` stand for literal braces; any other brace is an error.

Rows: ``Row.changes`` holds the row's own changes; the target's changes are
``job.changes_model().merged(row.changes)`` (the row wins where both name the same key).
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import hashlib
import json
import os
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TextIO

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from worker.errors import JobError
from worker.models import ENUMS, SETTABLE_FIELDS, Changes, Image, tag_problem

__all__ = [
    "ChangesSpec",
    "FileSelector",
    "Job",
    "Options",
    "Query",
    "QuerySelector",
    "Row",
    "SetFields",
    "check_selector_files",
    "iter_rows",
    "load_job",
    "render_template",
    "template_fields",
]

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


# ---------------------------------------------------------------------------------------------
# Templates and tag checks (shared by the job file and the selector files)

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


# ---------------------------------------------------------------------------------------------
# The models

_CONFIG = ConfigDict(extra="forbid", strict=True)
PositiveId = Annotated[int, Field(gt=0)]
NonEmpty = Annotated[str, Field(min_length=1)]


def _env_id(env: Mapping[str, str], var: str) -> int | None:
    raw = env.get(var)
    if raw is None or not raw.strip():
        return None
    if not re.fullmatch(r"[0-9]{1,18}", raw.strip()) or int(raw) <= 0:
        raise _Problem(f"{var}={_short(raw)} is not an ID (a positive whole number)")
    return int(raw)


def _context_env(info: ValidationInfo) -> Mapping[str, str]:
    ctx = info.context if isinstance(info.context, dict) else {}
    env = ctx.get("env")
    return env if env is not None else os.environ


class Query(BaseModel):
    """A query selector: server-side filters go to the list endpoint, the rest run here."""

    model_config = _CONFIG

    projects: list[PositiveId] | Literal["all"] = Field(default=None, validate_default=True)
    regions: list[PositiveId] | Literal["all"] = Field(default=None, validate_default=True)
    name: NonEmpty | None = None
    os_distro: NonEmpty | None = None
    os_version: NonEmpty | None = None
    visibility: Literal["private", "public", "shared"] | None = None
    architecture: Literal["aarch64", "x86_64"] | None = None
    tag_key: list[str] = Field(default_factory=list)
    tag_key_value: dict[str, str] | None = None
    name_glob: NonEmpty | None = None
    name_regex: NonEmpty | None = None
    has_tags: dict[str, str] = Field(default_factory=dict)
    missing_tags: list[str] = Field(default_factory=list)

    _glob: re.Pattern[str] | None = PrivateAttr(default=None)
    _regex: re.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("projects", "regions", mode="before")
    @classmethod
    def _ids(cls, value: object, info: ValidationInfo) -> object:
        field = info.field_name or "projects"
        var = _ID_ENV[field]
        if value is None:
            default = _env_id(_context_env(info), var)
            if default is None:
                raise _Problem(
                    f"no {field} given, and {var} is not set",
                    hint=f"write {field}: [ID, ...] or {field}: all, or set {var}",
                )
            return [default]
        if value == "all":
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            hint = "write all (lower case)" if str(value).lower() == "all" else None
            raise _Problem(f'must be a list of IDs or "all", not {_kind(value)}', hint=hint)
        if not value:
            raise _Problem(f'must not be empty; list at least one ID, or write "{field}: all"')
        seen: list[int] = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
                raise _Problem(
                    f"must be an ID (a positive whole number), not {_short(item)}", at=(i,)
                )
            if item not in seen:
                seen.append(item)
        return seen

    @field_validator("tag_key", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("tag_key", "missing_tags")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        return _check_keys(value)

    @field_validator("tag_key_value")
    @classmethod
    def _tag_key_value(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _check_tag_map(value, templates=False)

    @field_validator("has_tags")
    @classmethod
    def _has_tags(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            try:
                _check_key(key)
                if val != "*":
                    _check_key(val, "tag value")
            except _Problem as exc:
                raise _Problem(exc.message, at=(key,)) from None
        return value

    @field_validator("name_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise _Problem(
                    f"is not a valid regular expression: {exc.msg} at position {exc.pos}",
                    hint="Python re syntax; it is searched for in the image name",
                ) from None
        return value

    @model_validator(mode="after")
    def _compile(self) -> Query:
        if self.name_glob is not None:
            self._glob = re.compile(fnmatch.translate(self.name_glob))
        if self.name_regex is not None:
            self._regex = re.compile(self.name_regex)
        return self

    def server_params(self) -> list[tuple[str, str]]:
        """Query-string pairs of the server-side filters (no paging): ``tag_key`` repeated,
        ``tag_key_value`` as a JSON object."""
        pairs: list[tuple[str, str]] = []
        for name in ("name", "os_distro", "os_version", "visibility", "architecture"):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name, value))
        pairs.extend(("tag_key", key) for key in self.tag_key)
        if self.tag_key_value:
            pairs.append(("tag_key_value", json.dumps(self.tag_key_value, separators=(",", ":"))))
        return pairs

    def matcher(self) -> Callable[[Image], bool] | None:
        """``matches`` as a plain function, or None when the query has no client-side filter
        (the selectors call it once per listed image: no model attribute lookups there)."""
        glob, regex = self._glob, self._regex
        has_tags = dict(self.has_tags)
        missing = tuple(self.missing_tags)
        if glob is None and regex is None and not has_tags and not missing:
            return None

        def match(image: Image) -> bool:
            if glob is not None and not glob.match(image.name):
                return False
            if regex is not None and not regex.search(image.name):
                return False
            tags = image.tags
            for key, value in has_tags.items():
                if key not in tags or (value != "*" and tags[key] != value):
                    return False
            return not any(key in tags for key in missing)

        return match

    def matches(self, image: Image) -> bool:
        """The client-side filters: ``name_glob`` (whole name, case-sensitive), ``name_regex``
        (``re.search``), ``has_tags`` (``"*"`` = any value), ``missing_tags``."""
        match = self.matcher()
        return match is None or match(image)


class QuerySelector(BaseModel):
    model_config = _CONFIG
    query: Query


_EXTENSIONS: dict[str, Literal["csv", "json", "jsonl"]] = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


class FileSelector(BaseModel):
    """Explicit rows from a CSV, JSON or JSON Lines file, relative to the job file's folder.

    ``format`` is filled in from the extension when left out; ``path`` is the resolved path.
    """

    model_config = _CONFIG

    file: NonEmpty
    format: Literal["csv", "json", "jsonl"] | None = None

    _path: Path = PrivateAttr(default=Path())
    _display: str = PrivateAttr(default="")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def display(self) -> str:
        """The file as error messages name it (joined to the job file's path as given)."""
        return self._display or self.file

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> FileSelector:
        ctx = info.context if isinstance(info.context, dict) else {}
        base = Path(ctx.get("base", "."))
        self._path = (base / self.file).resolve()
        self._display = os.path.normpath(os.path.join(str(ctx.get("display_base", "")), self.file))
        if self.format is None:
            ext = Path(self.file).suffix.lower()
            if ext not in _EXTENSIONS:
                raise _Problem(
                    f"cannot tell the format of {self.file!r} from its extension",
                    hint="name it .csv, .json, .jsonl or .ndjson, or add format: csv|json|jsonl",
                    at=("file",),
                )
            self.format = _EXTENSIONS[ext]
        if ctx.get("check_files"):
            if not self._path.exists():
                raise _Problem(f"selector file not found: {self.display}", at=("file",))
            if not self._path.is_file():
                raise _Problem(f"selector file is not a file: {self.display}", at=("file",))
            if not os.access(self._path, os.R_OK):
                raise _Problem(f"selector file is not readable: {self.display}", at=("file",))
        return self


def _selector_kind(value: Any) -> str | None:
    if isinstance(value, QuerySelector):
        return "query"
    if isinstance(value, FileSelector):
        return "file"
    if isinstance(value, dict):
        if "query" in value and "file" in value:
            return "both"
        if "query" in value:
            return "query"
        if "file" in value:
            return "file"
    return None


Selector = Annotated[
    Annotated[QuerySelector, Tag("query")] | Annotated[FileSelector, Tag("file")],
    Discriminator(_selector_kind),
]


class SetFields(BaseModel):
    """The settable image fields; enums as the reference page lists them (models.ENUMS)."""

    model_config = _CONFIG

    name: str | None = None
    os_type: str | None = None
    ssh_key: str | None = None
    hw_firmware_type: str | None = None
    hw_machine_type: str | None = None
    is_baremetal: bool | None = None

    @field_validator(*SETTABLE_FIELDS)
    @classmethod
    def _check(cls, value: str | bool | None, info: ValidationInfo) -> str | bool | None:
        if value is None:
            return None
        return _check_field(info.field_name or "", value)

    def as_dict(self) -> dict[str, str | bool]:
        return {k: v for k in SETTABLE_FIELDS if (v := getattr(self, k)) is not None}


def _none_is_empty(value: object) -> object:
    return {} if value is None else value


class ChangesSpec(BaseModel):
    """What to do to every target; ``replace_tags`` excludes the three other tag changes."""

    model_config = _CONFIG

    set_tags: dict[str, str] = Field(default_factory=dict)
    remove_tags: list[str] = Field(default_factory=list)
    rename_tags: dict[str, str] = Field(default_factory=dict)
    replace_tags: dict[str, str] | None = None
    set: SetFields = Field(default_factory=SetFields)

    @field_validator("set_tags", "rename_tags", "set", mode="before")
    @classmethod
    def _none_mapping(cls, value: object) -> object:
        return _none_is_empty(value)

    @field_validator("remove_tags", mode="before")
    @classmethod
    def _none_list(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("set_tags", "replace_tags")
    @classmethod
    def _tags(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _check_tag_map(value)

    @field_validator("remove_tags")
    @classmethod
    def _removed(cls, value: list[str]) -> list[str]:
        return _check_keys(value)

    @field_validator("rename_tags")
    @classmethod
    def _renamed(cls, value: dict[str, str]) -> dict[str, str]:
        targets: dict[str, str] = {}
        for old, new in value.items():
            try:
                _check_key(old)
                _check_key(new, "new tag key")
            except _Problem as exc:
                raise _Problem(exc.message, at=(old,)) from None
            if old == new:
                raise _Problem(f"renames {old!r} to itself", at=(old,))
            if new in targets:
                raise _Problem(
                    f"{targets[new]!r} and {old!r} are both renamed to {new!r}", at=(old,)
                )
            if new in value:
                raise _Problem(
                    f"{new!r} is both renamed and a new name; chains and swaps are ambiguous",
                    at=(old,),
                )
            targets[new] = old
        return value

    @model_validator(mode="after")
    def _exclusive(self) -> ChangesSpec:
        if self.replace_tags is not None:
            for name in ("set_tags", "remove_tags", "rename_tags"):
                if getattr(self, name):
                    raise _Problem(
                        f"replace_tags cannot be combined with {name}",
                        hint="replace_tags gives the exact set of writable tags; put every tag "
                        "you want in it and drop set_tags, remove_tags and rename_tags",
                        at=("replace_tags",),
                    )
        for i, key in enumerate(self.remove_tags):
            if key in self.set_tags:
                raise _Problem(f"tag {key!r} is both set and removed", at=("remove_tags", i))
        for old, new in self.rename_tags.items():
            for name, keys in (("set_tags", self.set_tags), ("remove_tags", self.remove_tags)):
                if old in keys or new in keys:
                    raise _Problem(
                        f"rename {old!r} -> {new!r} conflicts with {name}, which names "
                        f"{old if old in keys else new!r}",
                        at=("rename_tags", old),
                    )
        return self

    def is_empty(self) -> bool:
        return self.to_changes().is_empty()

    def to_changes(self) -> Changes:
        return Changes(
            set_tags=dict(self.set_tags),
            remove_tags=tuple(self.remove_tags),
            rename_tags=dict(self.rename_tags),
            replace_tags=None if self.replace_tags is None else dict(self.replace_tags),
            set_fields=self.set.as_dict(),
        )


class Options(BaseModel):
    """Run options; seconds for times. ``on_read_only``: ``skip`` leaves an image whose planned
    change touches a read-only tag alone, ``partial`` plans the image's other changes."""

    model_config = _CONFIG

    concurrency: int = Field(default=16, ge=1, le=1024)
    rate_per_second: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_changes: int | None = Field(default=None, ge=0)
    max_changes_percent: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    lock_timeout_seconds: float = Field(default=900, gt=0, allow_inf_nan=False)
    retry_budget_seconds: float = Field(default=600, gt=0, allow_inf_nan=False)
    on_read_only: Literal["skip", "partial"] = "skip"
    page_size: int = Field(default=1000, ge=1, le=1000)
    #: retries may add at most this share of the run's requests (over a 10 s window)
    retry_budget_percent: float = Field(default=10, ge=0, le=100, allow_inf_nan=False)
    #: stop the run when this many targets in a row fail for the same reason
    stop_after_failures: int = Field(default=50, ge=1)


_NAME = re.compile(r"[a-z0-9-]{1,63}")


class Job(BaseModel):
    """A parsed, checked job file. ``path`` and ``sha256`` (of the file's bytes) are set by
    ``load_job``; ``--resume`` refuses a job whose hash changed."""

    model_config = _CONFIG

    name: str
    description: str | None = None
    targets: list[Selector] = Field(min_length=1)
    changes: ChangesSpec = Field(default_factory=ChangesSpec)
    options: Options = Field(default_factory=Options)

    _path: Path = PrivateAttr(default=Path())
    _sha256: str = PrivateAttr(default="")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def sha256(self) -> str:
        return self._sha256

    @field_validator("changes", "options", mode="before")
    @classmethod
    def _none_is_default(cls, value: object) -> object:
        return _none_is_empty(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise _Problem(
                f"{_short(value)} is not a job name",
                hint="1 to 63 characters of a-z, 0-9 and '-'",
            )
        return value

    @model_validator(mode="after")
    def _something_to_do(self) -> Job:
        if self.changes.is_empty() and any(isinstance(t, QuerySelector) for t in self.targets):
            raise _Problem(
                "is empty: there is nothing to do",
                hint="add set_tags, remove_tags, rename_tags, replace_tags or set; only file "
                "rows that carry their own changes can do without",
                at=("changes",),
            )
        return self

    def changes_model(self) -> Changes:
        """The job's changes as ``worker.models.Changes``."""
        return self.changes.to_changes()

    @property
    def file_selectors(self) -> list[FileSelector]:
        return [t for t in self.targets if isinstance(t, FileSelector)]

    @property
    def query_selectors(self) -> list[QuerySelector]:
        return [t for t in self.targets if isinstance(t, QuerySelector)]


# ---------------------------------------------------------------------------------------------
# Reading the job file: YAML (1.2 core scalars) or JSON, keeping every key's line


class _Resolver(yaml.resolver.BaseResolver):
    pass


for _tag, _regexp, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
    ("merge", r"^(?:<<)$", "<"),
):
    _Resolver.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_regexp), list(_first))


class _Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    yaml.constructor.SafeConstructor,
    _Resolver,
):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)


def _construct_int(loader: yaml.constructor.SafeConstructor, node: Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)  # type: ignore[type-var]

Lines = dict[Path_, int]
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class _YamlTree:
    """Builds plain data from YAML nodes and records each key's and item's line."""

    def __init__(self, loader: _Loader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.lines: Lines = {(): 1}
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()

    def fail(self, node: Node, message: str, hint: str | None = None) -> NoReturn:
        raise JobError(message, file=self.file, line=node.start_mark.line + 1, hint=hint)

    def walk(self, node: Node, path: Path_) -> Any:
        if isinstance(node, ScalarNode):
            try:
                return self.loader.construct_object(node)
            except (ValueError, TypeError, OverflowError) as exc:
                reason = str(exc).split(";")[0]
                self.fail(node, f"cannot read the value {_short(node.value)}: {reason}")
        key = id(node)
        if key in self.done:  # an alias of a node already read
            return self.done[key]
        if key in self.active:
            self.fail(node, "a YAML alias refers to itself")
        self.active.add(key)
        out: Any
        if isinstance(node, SequenceNode) and node.tag == _SEQ_TAG:
            out = []
            for i, child in enumerate(node.value):
                self.lines.setdefault((*path, i), child.start_mark.line + 1)
                out.append(self.walk(child, (*path, i)))
        elif isinstance(node, MappingNode) and node.tag == _MAP_TAG:
            out = self.walk_mapping(node, path)
        else:
            self.fail(node, f"YAML tag {node.tag!r} is not supported here")
        self.active.discard(key)
        self.done[key] = out
        return out

    def walk_mapping(self, node: MappingNode, path: Path_) -> dict[Any, Any]:
        own: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.key(key_node)
            if key in own:
                self.fail(key_node, f"duplicate key {_short(key)}", "each key may appear once")
            own.add(key)
        self.loader.flatten_mapping(node)  # resolves '<<' merges; the node's own keys win
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node)
            self.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = self.walk(value_node, (*path, key))
        return out

    def key(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            self.fail(node, "a key must be plain text, not a list or mapping")
        value = self.walk(node, ())
        if not isinstance(value, str):
            self.fail(node, f"a key must be text, not {_kind(value)}", f'quote it: "{node.value}"')
        return value


def _parse_yaml(text: str, file: str) -> tuple[Any, Lines]:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # checks the characters: may raise ReaderError
        node = loader.get_single_node()
        if node is None:
            return None, {(): 1}
        tree = _YamlTree(loader, file)
        return tree.walk(node, ()), tree.lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        hint = None
        if "\\t" in problem or "\t" in problem:
            hint = "YAML indents with spaces, not tabs"
        elif "block" in problem or "mapping values" in problem:
            hint = "check the indentation here and on the line before: keys of one mapping line up"
        raise JobError(
            f"YAML syntax error: {problem}",
            file=file,
            line=mark.line + 1 if mark else None,
            hint=hint,
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise JobError(
            f"the character U+{exc.character:04X} is not allowed in YAML", file=file, line=line
        ) from None
    except yaml.YAMLError as exc:
        raise JobError(f"YAML syntax error: {exc}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()


_WS = re.compile(r"[ \t\n\r]*")


class _JsonTree:
    """Builds data from JSON text already known to parse, recording each key's and item's line."""

    def __init__(self, text: str, file: str) -> None:
        self.text = text
        self.file = file
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.lines: Lines = {(): 1}
        self.decoder = json.JSONDecoder()

    def line(self, pos: int) -> int:
        return bisect_left(self.newlines, pos) + 1

    def skip(self, pos: int) -> int:
        match = _WS.match(self.text, pos)
        assert match is not None
        return match.end()

    def value(self, pos: int, path: Path_) -> tuple[Any, int]:
        text = self.text
        pos = self.skip(pos)
        if text[pos] == "{":
            obj: dict[str, Any] = {}
            pos = self.skip(pos + 1)
            if text[pos] == "}":
                return obj, pos + 1
            while True:
                pos = self.skip(pos)
                key, end = self.decoder.raw_decode(text, pos)
                if key in obj:
                    raise JobError(
                        f"duplicate key {_short(key)}", file=self.file, line=self.line(pos)
                    )
                self.lines[(*path, key)] = self.line(pos)
                pos = self.skip(end) + 1  # past ':'
                obj[key], pos = self.value(pos, (*path, key))
                pos = self.skip(pos)
                if text[pos] == "}":
                    return obj, pos + 1
                pos += 1  # ','
        if text[pos] == "[":
            items: list[Any] = []
            pos = self.skip(pos + 1)
            if text[pos] == "]":
                return items, pos + 1
            while True:
                pos = self.skip(pos)
                self.lines[(*path, len(items))] = self.line(pos)
                item, pos = self.value(pos, (*path, len(items)))
                items.append(item)
                pos = self.skip(pos)
                if text[pos] == "]":
                    return items, pos + 1
                pos += 1
        return self.decoder.raw_decode(text, pos)


def _parse_json(text: str, file: str) -> tuple[Any, Lines]:
    try:
        json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        raise JobError(
            f"JSON syntax error: {exc.msg} (column {exc.colno})", file=file, line=exc.lineno
        ) from None
    except _DuplicateKey:
        pass  # the tree below names the line and field
    except ValueError as exc:
        if _SURROGATE_MSG in str(exc):
            found = re.search(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", text)
            line = text.count("\n", 0, found.start()) + 1 if found else None
            raise JobError(f"a string {_SURROGATE_MSG}", file=file, line=line) from None
        raise JobError(f"cannot read the JSON: {str(exc).split(';')[0]}", file=file) from None
    tree = _JsonTree(text, file)
    data, _ = tree.value(0, ())
    return data, tree.lines


# ---------------------------------------------------------------------------------------------
# Translating pydantic errors into JobErrors

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
    return found[0][3]


# ---------------------------------------------------------------------------------------------
# load_job


def _read_bytes(path: Path, display: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise JobError("no such file", file=display) from None
    except IsADirectoryError:
        raise JobError("is a folder, not a file", file=display) from None
    except PermissionError:
        raise JobError("not readable (permission denied)", file=display) from None
    except OSError as exc:
        raise JobError(f"cannot read: {exc.strerror or exc}", file=display) from None


def _decode(data: bytes, display: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise JobError("is not UTF-8 text", file=display, line=line) from None


def load_job(path: str | Path, *, env: Mapping[str, str] | None = None) -> Job:
    """Read, parse and check a job file; selector files are checked to exist, not read.

    ``env`` (default ``os.environ``) supplies ``GCORE_CLOUD_PROJECT_ID`` /
    ``GCORE_CLOUD_REGION_ID`` for queries that leave ``projects`` / ``regions`` out.
    """
    display = str(path)
    job_path = Path(path)
    suffix = job_path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise JobError(
            "a job file must be YAML or JSON",
            file=display,
            hint="name it .yaml, .yml or .json",
        )
    data = _read_bytes(job_path, display)
    text = _decode(data, display)
    if not text.strip():
        raise JobError("the job file is empty", file=display, hint="see jobs/demo.yaml")
    try:
        parse = _parse_json if suffix == ".json" else _parse_yaml
        tree, lines = parse(text, display)
    except RecursionError:
        raise JobError("is nested too deeply to read", file=display) from None
    if tree is None:
        raise JobError("the job file is empty", file=display, hint="see jobs/demo.yaml")
    if not isinstance(tree, dict):
        raise JobError(
            f"a job must be a mapping of name, targets, changes and options, not {_kind(tree)}",
            file=display,
            line=1,
        )
    context = {
        "env": os.environ if env is None else env,
        "base": job_path.parent,
        "display_base": os.path.dirname(display),
        "check_files": True,
    }
    try:
        job = Job.model_validate(tree, context=context)
    except ValidationError as exc:
        raise _translate(exc, display, lines) from None
    job._path = job_path.resolve()
    job._sha256 = hashlib.sha256(data).hexdigest()
    return job


# ---------------------------------------------------------------------------------------------
# Selector files: streamed rows


@dataclass(frozen=True, slots=True)
class Row:
    """One row of a selector file: where the image is and the row's own changes.

    ``file`` is the selector's ``file`` as written in the job, ``line`` the row's first line.
    """

    project_id: int
    region_id: int
    image_id: str
    changes: Changes
    file: str
    line: int


_NO_CHANGES = Changes()
_IMAGE_ID = re.compile(r"[A-Za-z0-9._~-]{1,255}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_CHUNK = 1 << 16
_MAX_ROW = 1 << 24


class _Rows:
    """What every row reader needs: the file's name, env defaults, the job's changes."""

    def __init__(self, job: Job, selector: FileSelector, env: Mapping[str, str]) -> None:
        self.selector = selector
        self.file = selector.display
        self.env = env
        self.needs_changes = job.changes_model().is_empty()

    def fail(
        self, message: str, line: int | None, field: str | None = None, hint: str | None = None
    ) -> NoReturn:
        raise JobError(message, file=self.file, line=line, field=field, hint=hint)

    def default(self, column: str, line: int | None) -> int:
        var = PROJECT_ENV if column == "project_id" else REGION_ENV
        try:
            value = _env_id(self.env, var)
        except _Problem as exc:
            self.fail(exc.message, line, column)
        if value is None:
            self.fail(
                f"{column} is missing, and {var} is not set",
                line,
                column,
                hint=f"give every row a {column}, or set {var}",
            )
        return value

    def row(
        self, pid: int, rid: int, image_id: str, changes: Changes, *, line: int, field: str
    ) -> Row:
        if self.needs_changes and changes.is_empty():
            self.fail(
                "this row changes nothing, and the job's changes are empty: nothing to do",
                line,
                field,
                hint="give the row tags or fields to set, or add changes to the job",
            )
        return Row(pid, rid, image_id, changes, self.selector.file, line)


def _id_text(text: str, column: str) -> int:
    text = text.strip()
    if not text:
        raise _Problem("is empty", hint=f"every row needs a {column}")
    if not _DIGITS.fullmatch(text) or int(text) == 0:
        raise _Problem(f"must be an ID (a positive whole number), not {_short(text)}")
    return int(text)


def _image_id(value: object) -> str:
    if not isinstance(value, str):
        raise _Problem(f"must be text, not {_kind(value)}")
    value = value.strip()
    if not value:
        raise _Problem("is empty", hint="every row needs an image_id")
    if not _IMAGE_ID.fullmatch(value):
        raise _Problem(
            f"{_short(value)} is not an image ID",
            hint="image IDs are made of letters, digits and . _ ~ -",
        )
    return value


# CSV ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Column:
    index: int
    name: str
    kind: str  # project_id | region_id | image_id | tag | remove_tags | field
    key: str = ""


def _csv_header(header: list[str], rows: _Rows) -> list[_Column]:
    columns: list[_Column] = []
    seen: set[str] = set()
    known = ["project_id", "region_id", "image_id", "remove_tags", *SETTABLE_FIELDS]
    for i, raw in enumerate(header):
        name = raw.strip()
        if name in seen:
            rows.fail(f"column {name!r} appears twice", 1, name)
        seen.add(name)
        if name.startswith("tag:"):
            try:
                key = _check_key(name[4:])
            except _Problem as exc:
                rows.fail(exc.message, 1, name, hint="a tag column is named tag:<KEY>")
            columns.append(_Column(i, name, "tag", key))
        elif name in ("project_id", "region_id", "image_id", "remove_tags"):
            columns.append(_Column(i, name, name))
        elif name in SETTABLE_FIELDS:
            columns.append(_Column(i, name, "field", name))
        else:
            hint = _did_you_mean(name, known)
            if not hint and ":" in name:
                hint = f"a tag column is named tag:{name.split(':', 1)[1]}"
            rows.fail(
                f"unknown column {name!r}" if name else "a column has no name",
                1,
                name or f"column {i + 1}",
                hint=hint or "columns: " + ", ".join(known) + ", tag:<KEY>",
            )
    if "image_id" not in seen:
        rows.fail(
            "the header has no image_id column",
            1,
            "image_id",
            hint="the first line names the columns: project_id,region_id,image_id,...",
        )
    for column in ("project_id", "region_id"):
        if column not in seen:
            rows.default(column, 1)
    return columns


def _csv_rows(fh: TextIO, rows: _Rows) -> Iterator[Row]:
    reader = csv.reader(fh, strict=True)
    line = 1
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            rows.fail(
                "the file is empty; a CSV selector file starts with a header",
                1,
                hint="first line: project_id,region_id,image_id",
            )
        columns = _csv_header(header, rows)
        width = len(header)
        default_pid = None if "project_id" in header else rows.default("project_id", 1)
        default_rid = None if "region_id" in header else rows.default("region_id", 1)
        previous = reader.line_num
        for cells in reader:
            line, previous = previous + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != width:
                field = columns[len(cells)].name if len(cells) < width else f"column {width + 1}"
                rows.fail(f"the row has {len(cells)} cells; the header has {width}", line, field)
            yield _csv_row(cells, columns, rows, line=line, pid=default_pid, rid=default_rid)
    except csv.Error as exc:
        rows.fail(f"CSV syntax error: {exc}", reader.line_num or line)
    except UnicodeDecodeError:
        rows.fail("is not UTF-8 text", line + 1)


def _csv_row(
    cells: list[str],
    columns: list[_Column],
    rows: _Rows,
    *,
    line: int,
    pid: int | None,
    rid: int | None,
) -> Row:
    set_tags: dict[str, str] = {}
    removed: tuple[str, ...] = ()
    fields: dict[str, str | bool] = {}
    image_id = ""
    column = columns[0]
    try:
        for column in columns:
            cell = cells[column.index]
            kind = column.kind
            if kind == "image_id":
                image_id = _image_id(cell)
            elif kind == "project_id":
                pid = _id_text(cell, "project_id")
            elif kind == "region_id":
                rid = _id_text(cell, "region_id")
            elif not cell:
                continue
            elif kind == "tag":
                set_tags[column.key] = _check_value(cell)
            elif kind == "remove_tags":
                removed = tuple(dict.fromkeys(_check_key(k.strip()) for k in cell.split(";") if k))
            else:
                fields[column.key] = _check_field(column.key, cell, from_text=True)
    except _Problem as exc:
        rows.fail(exc.message, line, column.name, exc.hint)
    for key in removed:
        if key in set_tags:
            rows.fail(f"tag {key!r} is both set (tag:{key}) and removed", line, "remove_tags")
    assert pid is not None and rid is not None
    changes = (
        Changes(set_tags=set_tags, remove_tags=removed, set_fields=fields)
        if set_tags or removed or fields
        else _NO_CHANGES
    )
    return rows.row(pid, rid, image_id, changes, line=line, field="image_id")


# JSON and JSON Lines ----------------------------------------------------------------------------

_ROW_KEYS = ("project_id", "region_id", "image_id", "set_tags", "remove_tags", "set")
_ROW_KEY_SET = frozenset(_ROW_KEYS)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


_SURROGATE_MSG = "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON may escape a lone surrogate ("\ud800"): no API, file or database takes it as text
    for key, value in pairs:
        items = value if isinstance(value, list) else (value,)
        for text in (key, *items):
            if isinstance(text, str) and not _is_text(text):
                raise ValueError(f"a string {_SURROGATE_MSG}")
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


_ROW_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)


def _json_id(obj: Mapping[str, Any], column: str, rows: _Rows, line: int) -> int:
    if column not in obj or obj[column] is None:
        return rows.default(column, line)
    value = obj[column]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Problem(
            f"must be an ID (a positive whole number), not {_short(value)}", at=(column,)
        )
    return value


def _json_row(obj: object, rows: _Rows, line: int) -> Row:
    try:
        if not isinstance(obj, dict):
            raise _Problem(
                f"a row must be an object with image_id (and project_id, region_id, set_tags, "
                f"remove_tags, set), not {_kind(obj)}"
            )
        for key in () if _ROW_KEY_SET.issuperset(obj) else obj:
            if key not in _ROW_KEY_SET:
                raise _Problem(
                    "unknown key",
                    hint=_did_you_mean(key, _ROW_KEYS) or "row keys: " + ", ".join(_ROW_KEYS),
                    at=(key,),
                )
        if "image_id" not in obj:
            raise _Problem("is required", at=("image_id",))
        try:
            image_id = _image_id(obj["image_id"])
        except _Problem as exc:
            raise _Problem(exc.message, at=("image_id",)) from None
        pid = _json_id(obj, "project_id", rows, line)
        rid = _json_id(obj, "region_id", rows, line)
        changes = _json_changes(obj)
    except _Problem as exc:
        rows.fail(exc.message, line, _dotted(exc.at) or None, exc.hint)
    return rows.row(pid, rid, image_id, changes, line=line, field="image_id")


def _json_changes(obj: Mapping[str, Any]) -> Changes:
    set_tags = obj.get("set_tags")
    removed = obj.get("remove_tags")
    fields = obj.get("set")
    if set_tags is None and removed is None and fields is None:
        return _NO_CHANGES
    set_tags = {} if set_tags is None else set_tags
    removed = [] if removed is None else removed
    fields = {} if fields is None else fields
    if not isinstance(set_tags, dict):
        raise _Problem(f"must be an object of tags, not {_kind(set_tags)}", at=("set_tags",))
    try:
        set_tags = _check_tag_map(set_tags)
    except _Problem as exc:
        raise _Problem(exc.message, hint=exc.hint, at=("set_tags", *exc.at)) from None
    if not isinstance(removed, list):
        raise _Problem(f"must be a list of tag keys, not {_kind(removed)}", at=("remove_tags",))
    for i, key in enumerate(removed):
        try:
            _check_key(key)
        except _Problem as exc:
            raise _Problem(exc.message, at=("remove_tags", i)) from None
        if key in set_tags:
            raise _Problem(f"tag {key!r} is both set and removed", at=("remove_tags", i))
    if not isinstance(fields, dict):
        raise _Problem(f"must be an object of fields, not {_kind(fields)}", at=("set",))
    checked: dict[str, str | bool] = {}
    for name, value in fields.items():
        if name not in SETTABLE_FIELDS:
            raise _Problem(
                "unknown field",
                hint=_did_you_mean(name, SETTABLE_FIELDS)
                or "settable: " + ", ".join(SETTABLE_FIELDS),
                at=("set", name),
            )
        if value is None:
            continue
        try:
            checked[name] = _check_field(name, value)
        except _Problem as exc:
            raise _Problem(exc.message, hint=exc.hint, at=("set", name)) from None
    if not (set_tags or removed or checked):
        return _NO_CHANGES
    return Changes(set_tags=set_tags, remove_tags=tuple(dict.fromkeys(removed)), set_fields=checked)


def _jsonl_rows(fh: TextIO, rows: _Rows) -> Iterator[Row]:
    line = 0
    seen_any = False
    try:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            seen_any = True
            try:
                obj = _ROW_DECODER.decode(text)
            except json.JSONDecodeError as exc:
                rows.fail(f"JSON syntax error: {exc.msg} (column {exc.colno})", line)
            except _DuplicateKey as exc:
                rows.fail(f"duplicate key {exc.key!r}", line, exc.key)
            except (ValueError, RecursionError) as exc:
                rows.fail(f"cannot read the row: {str(exc).split(';')[0]}", line)
            yield _json_row(obj, rows, line)
    except UnicodeDecodeError:
        rows.fail("is not UTF-8 text", line + 1)
    if not seen_any:
        rows.fail("the file is empty; JSON Lines hold one row object a line", 1)


class _JsonStream:
    """A window over a text stream for incremental JSON decoding, counting lines as it goes."""

    def __init__(self, fh: TextIO, rows: _Rows) -> None:
        self.fh = fh
        self.rows = rows
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # the line at buf[counted]
        self.counted = 0

    def fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.fh.read(_CHUNK)
        except UnicodeDecodeError:
            self.rows.fail("is not UTF-8 text", self.lineno(len(self.buf)))
        if not chunk:
            self.eof = True
            return False
        if self.pos:
            self.lineno(self.pos)
            self.buf = self.buf[self.pos :] + chunk
            self.pos = self.counted = 0
        else:
            self.buf += chunk
        return True

    def lineno(self, pos: int) -> int:
        if pos > self.counted:
            self.line += self.buf.count("\n", self.counted, pos)
            self.counted = pos
        return self.line

    def peek(self) -> str:
        """The next non-blank character ('' at the end), leaving ``pos`` on it."""
        while True:
            match = _WS.match(self.buf, self.pos)
            assert match is not None
            self.pos = match.end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def value(self) -> Any:
        while True:
            try:
                value, end = _ROW_DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = len(self.buf) - exc.pos <= 16 or exc.msg.startswith("Unterminated")
                if cut and len(self.buf) - self.pos < _MAX_ROW and self.fill():
                    continue
                line = self.lineno(exc.pos)
                self.rows.fail(f"JSON syntax error: {exc.msg}", line)
            except _DuplicateKey as exc:
                self.rows.fail(f"duplicate key {exc.key!r}", self.lineno(self.pos), exc.key)
            except (ValueError, RecursionError) as exc:
                reason = str(exc).split(";")[0]
                self.rows.fail(f"cannot read the row: {reason}", self.lineno(self.pos))
            self.pos = end
            return value


def _json_list_rows(fh: TextIO, rows: _Rows) -> Iterator[Row]:
    stream = _JsonStream(fh, rows)
    first = stream.peek()
    if first == "":
        rows.fail("the file is empty; a .json selector file holds a list of row objects", 1)
    if first != "[":
        rows.fail(
            "a .json selector file must hold a list of row objects",
            stream.lineno(stream.pos),
            hint='[{"project_id": 1, "region_id": 2, "image_id": "..."}, ...]; '
            "or name it .jsonl for one object a line",
        )
    stream.pos += 1
    if stream.peek() == "]":
        stream.pos += 1
    else:
        while True:
            line = stream.lineno(stream.pos)
            obj = stream.value()
            yield _json_row(obj, rows, line)
            after = stream.peek()
            if after == ",":
                stream.pos += 1
                if stream.peek() == "]":
                    rows.fail("JSON syntax error: a comma before ']'", stream.lineno(stream.pos))
                continue
            if after == "]":
                stream.pos += 1
                break
            where = stream.lineno(stream.pos)
            if after == "":
                rows.fail("JSON syntax error: the list is not closed with ']'", where)
            rows.fail(f"JSON syntax error: expected ',' or ']' after a row, not {after!r}", where)
    if stream.peek() != "":
        rows.fail("JSON syntax error: text after the list", stream.lineno(stream.pos))


_READERS: dict[str, Callable[[TextIO, _Rows], Iterator[Row]]] = {
    "csv": _csv_rows,
    "json": _json_list_rows,
    "jsonl": _jsonl_rows,
}


def iter_rows(
    job: Job, selector: FileSelector, *, env: Mapping[str, str] | None = None
) -> Iterator[Row]:
    """The rows of a selector file, streamed (flat memory whatever the size).

    Raises JobError (file, line, field) at the first bad row; rows before it have been yielded.
    ``env`` (default ``os.environ``) supplies project/region IDs that rows leave out.
    """
    rows = _Rows(job, selector, os.environ if env is None else env)
    reader = _READERS[selector.format or _EXTENSIONS.get(selector.path.suffix.lower(), "csv")]
    try:
        fh = open(selector.path, encoding="utf-8-sig", newline="")  # noqa: SIM115
    except FileNotFoundError:
        rows.fail("no such file", None, hint=f"named by the job's target file: {selector.file}")
    except IsADirectoryError:
        rows.fail("is a folder, not a file", None)
    except OSError as exc:
        rows.fail(f"cannot read: {exc.strerror or exc}", None)
    with fh:
        yield from reader(fh, rows)


def check_selector_files(job: Job, *, env: Mapping[str, str] | None = None) -> dict[str, int]:
    """Read every selector file through, checking every row; rows per file (as the job names it)."""
    counts: dict[str, int] = {}
    for selector in job.file_selectors:
        counts[selector.file] = sum(1 for _ in iter_rows(job, selector, env=env))
    return counts

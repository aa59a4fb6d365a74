"""The job file's models: ``Job`` (name, targets, changes, options), the two selectors
(``Query``, ``FileSelector``), ``ChangesSpec`` and ``Options``."""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker import defaults, safety, units
from worker.models import SETTABLE_FIELDS, Changes, Image
from worker.spec.checks import (
    _ID_ENV,
    _check_field,
    _check_key,
    _check_keys,
    _check_tag_map,
    _env_id,
    _kind,
    _Problem,
    _short,
)

_CONFIG = ConfigDict(extra="forbid", strict=True)
PositiveId = Annotated[int, Field(gt=0)]
NonEmpty = Annotated[str, Field(min_length=1)]


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
    missing_tags: list[str] | dict[str, str] = Field(default_factory=list)
    created_before: NonEmpty | None = None
    created_after: NonEmpty | None = None
    updated_before: NonEmpty | None = None
    updated_after: NonEmpty | None = None

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

    @field_validator("tag_key")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        return _check_keys(value)

    @field_validator("missing_tags")
    @classmethod
    def _missing(cls, value: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
        if isinstance(value, list):
            return _check_keys(value)
        return cls._has_tags(value)

    @field_validator("created_before", "created_after", "updated_before", "updated_after")
    @classmethod
    def _moment(cls, value: str | None) -> str | None:
        if value is not None:
            moment(value)
        return value

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

    def matcher(self, now: datetime | None = None) -> Callable[[Image], bool] | None:
        """The client-side filters as a plain function, or None when the query has none:
        ``name_glob`` (whole name, case-sensitive), ``name_regex`` (``re.search``), ``has_tags``
        (a value: exact, or a glob with ``*``/``?``/``[...]``; ``"*"`` = any value),
        ``missing_tags`` (a list of keys: none of them present; a mapping: no key holding a
        value its glob matches), ``created_before``/``created_after``/``updated_before``/
        ``updated_after`` (a date, a time or a duration back from ``now``; an image without
        the field does not match). The selectors call it once per listed image: no model
        attribute lookups there."""
        glob, regex = self._glob, self._regex
        has_tags = {key: _value_test(value) for key, value in self.has_tags.items()}
        missing_map = self.missing_tags if isinstance(self.missing_tags, dict) else {}
        missing = tuple(self.missing_tags) if isinstance(self.missing_tags, list) else ()
        not_holding = {key: _value_test(value) for key, value in missing_map.items()}
        now = now or datetime.now(UTC)
        ages = [
            (f"{field}_at", edge == "before", _cutoff(value, now))
            for field in ("created", "updated") for edge in ("before", "after")
            if (value := getattr(self, f"{field}_{edge}")) is not None
        ]
        if (glob is None and regex is None and not has_tags and not missing and not not_holding
                and not ages):
            return None

        def match(image: Image) -> bool:
            if glob is not None and not glob.match(image.name):
                return False
            if regex is not None and not regex.search(image.name):
                return False
            tags = image.tags
            for key, test in has_tags.items():
                if key not in tags or not test(tags[key]):
                    return False
            for key, test in not_holding.items():
                if key in tags and test(tags[key]):
                    return False
            for name, before, cutoff in ages:
                at = image_time(image.raw.get(name))
                if at is None or (at >= cutoff if before else at <= cutoff):
                    return False
            return not any(key in tags for key in missing)

        return match


_GLOB_CHARS = frozenset("*?[")
_DURATION = re.compile(r"(\d+)([smhdw])")


def _value_test(value: str) -> Callable[[str], bool]:
    """A tag value test: ``*`` any value, a glob (``team-*``) by fnmatch, else exact."""
    if value == "*":
        return lambda held: True
    if _GLOB_CHARS.intersection(value):
        return re.compile(fnmatch.translate(value)).match  # type: ignore[return-value]
    return value.__eq__


def moment(text: str) -> datetime | timedelta:
    """An age filter's value: a duration (``90d``, ``12h``, ``2w``) or a date/time (``2024-01-31``,
    ``2024-01-31T12:00:00Z``; UTC where no offset is given). ``_Problem`` otherwise."""
    found = _DURATION.fullmatch(text.strip())
    if found:
        return timedelta(seconds=int(found.group(1)) * units.SECONDS_PER_UNIT[found.group(2)])
    at = image_time(text)
    if at is None:
        raise _Problem(
            f"{_short(text)} is neither a date nor a duration",
            hint="a date (2024-01-31), a UTC time (2024-01-31T12:00:00Z) or a duration "
            "back from now (90d, 12h, 2w)",
        )
    return at


def image_time(value: object) -> datetime | None:
    """An ISO 8601 date or time as an aware UTC datetime (naive means UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _cutoff(value: str, now: datetime) -> datetime:
    at = moment(value)
    return now - at if isinstance(at, timedelta) else at


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
            if safety.is_special(self._path):  # /proc/self/environ holds the key
                raise _Problem(f"selector file is under /proc, /sys or /dev: {self.display}",
                               at=("file",), hint="name a regular file")
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

    # before pydantic's strict types: is_baremetal may be text ("yes"), read by the one rule
    @field_validator(*SETTABLE_FIELDS, mode="before")
    @classmethod
    def _check(cls, value: object, info: ValidationInfo) -> str | bool | None:
        if value is None:
            return None
        return _check_field(info.field_name or "", value)

    def as_dict(self) -> dict[str, str | bool]:
        return {k: v for k in SETTABLE_FIELDS if (v := getattr(self, k)) is not None}


def _none_is_empty(value: object) -> object:
    return {} if value is None else value


class ChangesSpec(BaseModel):
    """What to do to every target; ``replace_tags`` excludes the other tag changes.
    ``add_tags`` sets a key only where an image has none (one holding another value keeps it)."""

    model_config = _CONFIG

    set_tags: dict[str, str] = Field(default_factory=dict)
    add_tags: dict[str, str] = Field(default_factory=dict)
    remove_tags: list[str] = Field(default_factory=list)
    rename_tags: dict[str, str] = Field(default_factory=dict)
    replace_tags: dict[str, str] | None = None
    set: SetFields = Field(default_factory=SetFields)

    @field_validator("set_tags", "add_tags", "rename_tags", "set", mode="before")
    @classmethod
    def _none_mapping(cls, value: object) -> object:
        return _none_is_empty(value)

    @field_validator("remove_tags", mode="before")
    @classmethod
    def _none_list(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("set_tags", "add_tags", "replace_tags")
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
            for name in ("set_tags", "add_tags", "remove_tags", "rename_tags"):
                if getattr(self, name):
                    raise _Problem(
                        f"replace_tags cannot be combined with {name}",
                        hint="replace_tags gives the exact set of writable tags; put every tag "
                        "you want in it and drop set_tags, add_tags, remove_tags and rename_tags",
                        at=("replace_tags",),
                    )
        for i, key in enumerate(self.remove_tags):
            if key in self.set_tags:
                raise _Problem(f"tag {key!r} is both set and removed", at=("remove_tags", i))
        for key in self.add_tags:
            for name, keys in (("set_tags", self.set_tags), ("remove_tags", self.remove_tags)):
                if key in keys:
                    raise _Problem(f"tag {key!r} is both in add_tags and {name}",
                                   hint="add_tags sets a key only where it is missing; "
                                   "set_tags always sets it", at=("add_tags", key))
        for old, new in self.rename_tags.items():
            for name, keys in (("set_tags", self.set_tags), ("remove_tags", self.remove_tags),
                               ("add_tags", self.add_tags)):
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
            add_tags=dict(self.add_tags),
            remove_tags=tuple(self.remove_tags),
            rename_tags=dict(self.rename_tags),
            replace_tags=None if self.replace_tags is None else dict(self.replace_tags),
            set_fields=self.set.as_dict(),
        )


class Options(BaseModel):
    """Run options; seconds for times. ``on_read_only``: ``skip`` leaves an image whose planned
    change touches a read-only tag alone, ``partial`` plans the image's other changes."""

    model_config = _CONFIG

    concurrency: int = Field(default=defaults.CONCURRENCY, ge=1, le=defaults.MAX_CONCURRENCY)
    rate_per_second: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_changes: int | None = Field(default=None, ge=0)
    max_changes_percent: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    lock_timeout_seconds: float = Field(
        default=defaults.LOCK_TIMEOUT_S, gt=0, allow_inf_nan=False
    )
    retry_budget_seconds: float = Field(
        default=defaults.RETRY_BUDGET_S, gt=0, allow_inf_nan=False
    )
    on_read_only: Literal["skip", "partial"] = "skip"
    page_size: int = Field(default=defaults.PAGE_SIZE, ge=1, le=defaults.PAGE_SIZE)
    #: retries may add at most this share of the run's requests (over a 10 s window)
    retry_budget_percent: float = Field(
        default=defaults.RETRY_BUDGET_PERCENT, ge=0, le=100, allow_inf_nan=False
    )
    #: stop the run when this many targets in a row fail for the same reason
    stop_after_failures: int = Field(default=defaults.STOP_AFTER_FAILURES, ge=1)
    #: a selector that matches no image stops the run before any PATCH (exit 3)
    require_matches: bool = False


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
                hint="add set_tags, add_tags, remove_tags, rename_tags, replace_tags or set; "
                "only file "
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

"""The data that flows between the stages: images, changes, targets and outcomes.

Plain slotted dataclasses (the hot path builds one of each per image; pydantic is kept for the
job file, where its error messages matter). Units: seconds unless a name says ``_ms``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

#: The image fields a job may set, besides tags (PATCH body of the reference page).
SETTABLE_FIELDS: tuple[str, ...] = (
    "name",
    "os_type",
    "ssh_key",
    "hw_firmware_type",
    "hw_machine_type",
    "is_baremetal",
)

#: The fields of an image (the API's reference page, required and optional), which a template
#: may read as ``{image.<field>}``. ``tags`` is left out: a tag is ``{tags.<key>}``.
IMAGE_FIELDS: tuple[str, ...] = (
    "architecture", "created_at", "creator_task_id", "description", "disk_format",
    "display_order", "gpu_driver", "gpu_driver_type", "gpu_driver_version", "hw_firmware_type",
    "hw_machine_type", "id", "is_baremetal", "min_disk", "min_ram", "name", "os_distro",
    "os_type", "os_version", "project_id", "region", "region_id", "size", "ssh_key", "status",
    "task_id", "updated_at", "visibility",
)  # fmt: skip

#: Values the worker may send (the reference page). Responses may carry others (the SDK's
#: ``i440``, future values): those are kept as plain strings, never refused.
ENUMS: dict[str, tuple[str, ...]] = {
    "os_type": ("linux", "windows"),
    "ssh_key": ("allow", "deny", "required"),
    "hw_firmware_type": ("bios", "uefi"),
    "hw_machine_type": ("pc", "q35"),
}

TAG_MAX_LEN = 255
_TAG_FORBIDDEN = frozenset(" \t\n\r\v\f=")


def tag_problem(text: object) -> str | None:
    """Why ``text`` is not a valid tag key or value as the API checks it, or None if it is."""
    if not isinstance(text, str):
        return f"must be a string, not {type(text).__name__}"
    if not text:
        return "must not be empty"
    if len(text) > TAG_MAX_LEN:
        return f"is {len(text)} characters long; at most {TAG_MAX_LEN} are allowed"
    if any(ch in _TAG_FORBIDDEN or ch.isspace() for ch in text):
        return "must not contain whitespace or '='"
    return None


@dataclass(slots=True)
class Image:
    """An image as the API returned it, read leniently.

    ``tags`` holds every tag (read-only ones too), ``read_only`` the keys the user may not
    touch, ``raw`` the whole JSON object (templates read ``{image.<field>}`` from it).
    """

    id: str
    project_id: int
    region_id: int
    name: str
    tags: dict[str, str]
    read_only: frozenset[str]
    task_id: str | None
    raw: dict[str, Any]

    @classmethod
    def from_api(
        cls, data: Mapping[str, Any], *, project_id: int | None = None, region_id: int | None = None
    ) -> Image:
        """Build from an API object: ``tags`` or ``tags_v2``, unknown fields ignored."""
        tag_list = data.get("tags")
        if tag_list is None:
            tag_list = data.get("tags_v2") or []
        tags: dict[str, str] = {}
        read_only: set[str] = set()
        if type(tag_list) is not list and isinstance(tag_list, Mapping):
            tags = {str(k): str(v) for k, v in tag_list.items()}  # a plain {key: value}
        else:
            for tag in tag_list:
                key = str(tag.get("key"))
                tags[key] = str(tag.get("value", ""))
                if tag.get("read_only"):
                    read_only.add(key)
        pid = data.get("project_id", project_id)
        rid = data.get("region_id", region_id)
        return cls(
            id=str(data["id"]),
            project_id=int(pid if pid is not None else project_id or 0),
            region_id=int(rid if rid is not None else region_id or 0),
            name=str(data.get("name") or ""),
            tags=tags,
            read_only=frozenset(read_only),
            task_id=str(data["task_id"]) if data.get("task_id") else None,
            raw=data if type(data) is dict else dict(data),
        )

    def state(self) -> dict[str, Any]:
        """The writable state: every tag and the settable fields the API returned."""
        out: dict[str, Any] = {"tags": dict(self.tags)}
        raw = self.raw
        for name in SETTABLE_FIELDS:
            if name in raw:
                out[name] = raw[name]
        return out


@dataclass(frozen=True, slots=True)
class Changes:
    """What to do to an image. ``replace_tags`` excludes the other tag changes.

    ``add_tags`` sets a key only where the image has none (an image whose key holds another
    value keeps it: ``unchanged`` for that key).

    ``set_fields`` holds the settable fields (see SETTABLE_FIELDS); string values and tag
    values may hold templates (``{image.name}``, ``{tags.owner}``, ``{run.date}``, ``{run.id}``;
    see worker.templates) -- unless ``literal``.

    ``literal``: every value is text to send exactly as it is, never a template. Undo's changes
    are literal (``from_patch``): they restore values an image held, which may hold braces. The
    journal keeps the flag with the changes, so a resumed undo and a re-plan after a task lock
    read the values as the first plan did.
    """

    set_tags: Mapping[str, str] = field(default_factory=dict)
    remove_tags: tuple[str, ...] = ()
    rename_tags: Mapping[str, str] = field(default_factory=dict)
    replace_tags: Mapping[str, str] | None = None
    set_fields: Mapping[str, str | bool] = field(default_factory=dict)
    literal: bool = False
    add_tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_patch(cls, patch: Mapping[str, Any]) -> Changes:
        """The literal changes that send ``patch`` (a merge patch: a null tag is removed)."""
        tags = patch.get("tags") or {}
        return cls(
            set_tags={k: v for k, v in tags.items() if v is not None},
            remove_tags=tuple(k for k, v in tags.items() if v is None),
            set_fields={k: v for k, v in patch.items() if k != "tags"},
            literal=True,
        )

    def is_empty(self) -> bool:
        return not (
            self.set_tags
            or self.remove_tags
            or self.rename_tags
            or self.replace_tags is not None
            or self.set_fields
            or self.add_tags
        )

    def merged(self, row: Changes) -> Changes:
        """These changes with a row's added; where both name the same key, the row wins.

        Both must be templates or both literal: one flag holds for all the values."""
        if row.literal is not self.literal:
            raise ValueError("cannot merge literal changes with templates")
        if row.is_empty():
            return self
        if self.is_empty():
            return row
        row_keys = set(row.set_tags) | set(row.remove_tags) | set(row.add_tags)
        add_tags = {k: v for k, v in self.add_tags.items() if k not in row_keys}
        add_tags.update(row.add_tags)
        if self.replace_tags is not None:
            replace = {k: v for k, v in self.replace_tags.items() if k not in row.remove_tags}
            replace.update(row.set_tags)
            return Changes(
                replace_tags=replace,
                set_fields={**self.set_fields, **row.set_fields},
                literal=self.literal,
            )
        set_tags = {k: v for k, v in self.set_tags.items() if k not in row_keys}
        set_tags.update(row.set_tags)
        remove = tuple(k for k in self.remove_tags if k not in row_keys)
        remove += tuple(k for k in row.remove_tags if k not in remove)
        rename: dict[str, str] = {}
        for old, new in self.rename_tags.items():
            if old in row_keys:
                continue
            if new in row_keys:
                # the row says what the new key holds: the old key only goes away
                if old not in remove:
                    remove += (old,)
                continue
            rename[old] = new
        rename.update(row.rename_tags)
        return Changes(
            set_tags=set_tags,
            add_tags={k: v for k, v in add_tags.items() if k not in set_tags},
            remove_tags=remove,
            rename_tags=rename,
            set_fields={**self.set_fields, **row.set_fields},
            literal=self.literal,
        )


@dataclass(slots=True)
class Target:
    """One image to change: where it is, what to do, and (once read) its current state.

    ``image`` is None until the state is known, and stays None for an image that does not
    exist (the pool ends such a target ``failed`` / ``not_found``). ``source`` says which
    selector named it (``query 1``, ``owners.csv:12``).
    """

    project_id: int
    region_id: int
    image_id: str
    changes: Changes
    image: Image | None = None
    source: str = ""

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.project_id, self.region_id, self.image_id)


@dataclass(frozen=True, slots=True)
class RunContext:
    """What templates may name besides the image: ``{run.id}`` and ``{run.date}`` (UTC)."""

    run_id: str
    run_date: str


#: Keys of a results.jsonl line, in order; also the columns of results.csv (README, "Read a
#: run's report from the volume").
RESULT_FIELDS: tuple[str, ...] = (
    "run_id", "project_id", "region_id", "image_id", "name", "status", "reason", "before",
    "after", "patch", "attempts", "http_status", "lock_wait_s", "duration_ms", "error",
)

#: Final statuses of a target; ``planned`` is a plan-only record (``bulk-tagger plan``).
STATUSES: tuple[str, ...] = ("updated", "unchanged", "skipped", "failed", "planned")


# not frozen (made once a target, never changed): a frozen dataclass's __init__ costs
# about three times as much, and this is on every target's path
@dataclass(slots=True)
class Outcome:
    """How one target ended: one record per target per run (the results.jsonl line)."""

    project_id: int
    region_id: int
    image_id: str
    name: str
    status: str
    reason: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    patch: dict[str, Any] | None = None
    attempts: int = 0
    http_status: int | None = None
    lock_wait_s: float = 0.0
    duration_ms: int = 0
    error: str | None = None


# The changes as JSON text: how the journal and the selectors' staging file keep them.


def changes_to_json(changes: Changes) -> str:
    data: dict[str, Any] = {}
    if changes.set_tags:
        data["set_tags"] = dict(changes.set_tags)
    if changes.add_tags:
        data["add_tags"] = dict(changes.add_tags)
    if changes.remove_tags:
        data["remove_tags"] = list(changes.remove_tags)
    if changes.rename_tags:
        data["rename_tags"] = dict(changes.rename_tags)
    if changes.replace_tags is not None:
        data["replace_tags"] = dict(changes.replace_tags)
    if changes.set_fields:
        data["set_fields"] = dict(changes.set_fields)
    if changes.literal:
        data["literal"] = True  # undo's values: sent as they are, never rendered
    return orjson.dumps(data).decode()


@functools.lru_cache(maxsize=1024)
def changes_from_json(text: str | None) -> Changes:
    """Changes from their JSON (cached: most targets of a run share the job's changes)."""
    data = (None if text is None else orjson.loads(text)) or {}
    return Changes(
        set_tags=data.get("set_tags", {}),
        remove_tags=tuple(data.get("remove_tags", ())),
        rename_tags=data.get("rename_tags", {}),
        replace_tags=data.get("replace_tags"),
        set_fields=data.get("set_fields", {}),
        literal=data.get("literal", False) is True,
        add_tags=data.get("add_tags", {}),
    )

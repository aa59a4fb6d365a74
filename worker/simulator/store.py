"""The simulator's state: images (demo ones made lazily, changed ones stored), tasks, and the
rules of the API that touch state (list filters, PATCH validation, the merge patch, locks).

No HTTP here: errors are ``ApiFault(status, message, exception_class)`` for the server to
answer. Every index below is an int: ``0 <= i < n`` are demo images (made on demand unless
``_recs`` holds a changed copy), ``i >= n`` are images added by ``add``.
"""

from __future__ import annotations

import heapq
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from worker.models import tag_problem
from worker.simulator.demo import PROJECT_IDS, REGION_NAMES, Demo, iso

ImageKey = tuple[int, int, str]

#: PATCH body fields and the values each accepts (None: a type check only).
PATCH_ENUMS: dict[str, frozenset[str]] = {
    "os_type": frozenset({"linux", "windows"}),
    "ssh_key": frozenset({"allow", "deny", "required"}),
    "hw_firmware_type": frozenset({"bios", "uefi"}),
    # the reference page says pc/q35, the SDK i440/q35: both are accepted
    "hw_machine_type": frozenset({"pc", "q35", "i440"}),
}
PATCH_FIELDS = frozenset({"name", "is_baremetal", "tags", *PATCH_ENUMS})
VISIBILITY_VALUES = frozenset({"private", "public", "shared"})
ARCHITECTURES = frozenset({"aarch64", "x86_64"})
TASK_END_STATES = frozenset({"FINISHED", "ERROR"})
NAME_MAX = 255


class ApiFault(Exception):
    """An error answer: HTTP ``status`` and the JSON body's ``message``/``exception_class``."""

    def __init__(self, status: int, message: str, exception_class: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.exception_class = exception_class
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "exception_class": self.exception_class, **self.extra}


class Rec:
    """One stored image: API fields but the tags (``doc``), the tags in order, the read-only
    keys, and its JSON text once made (dropped on every change)."""

    __slots__ = ("doc", "index", "json", "ro", "tags")

    def __init__(
        self, index: int, doc: dict[str, Any], tags: dict[str, str], ro: frozenset[str]
    ) -> None:
        self.index = index
        self.doc = doc
        self.tags = tags
        self.ro = ro
        self.json: str | None = None

    def api(self) -> dict[str, Any]:
        """The image as the API shows it: a fresh dict (``tags`` and ``tags_v2`` alike)."""
        out = dict(self.doc)
        ro = self.ro
        out["tags"] = [{"key": k, "value": v, "read_only": k in ro} for k, v in self.tags.items()]
        out["tags_v2"] = [dict(t) for t in out["tags"]]
        return out

    def text(self) -> str:
        if self.json is None:
            # the tag list is encoded once and written twice (tags, tags_v2)
            ro = self.ro
            tags = _dumps(
                [{"key": k, "value": v, "read_only": k in ro} for k, v in self.tags.items()]
            )
            doc = _dumps(self.doc)
            self.json = f'{doc[:-1]},"tags":{tags},"tags_v2":{tags}}}'
        return self.json


@dataclass(frozen=True, slots=True)
class Filter:
    """The list endpoint's filters, normalised. ``fixed`` ones never change after creation."""

    os_distro: str | None = None
    os_version: str | None = None
    visibility: str | None = None
    architecture: str | None = None
    name: str | None = None
    tag_keys: tuple[str, ...] = ()
    tag_values: tuple[tuple[str, str], ...] = ()

    def fixed(self) -> tuple[str | None, ...]:
        return (self.os_distro, self.os_version, self.visibility, self.architecture)

    def changeable(self) -> bool:
        return bool(self.name is not None or self.tag_keys or self.tag_values)

    def match_os(self, os_distro: str, os_version: str, architecture: str | None) -> bool:
        return (
            (self.os_distro is None or os_distro.lower() == self.os_distro)
            and (self.os_version is None or os_version.lower() == self.os_version)
            and (self.architecture is None or architecture == self.architecture)
        )

    def match_visibility(self, visibility: str) -> bool:
        return self.visibility is None or visibility == self.visibility

    def match_changeable(self, name: str, tags: Mapping[str, str]) -> bool:
        if self.name is not None and self.name not in name.lower():
            return False
        if any(k not in tags for k in self.tag_keys):
            return False
        return all(tags.get(k) == v for k, v in self.tag_values)


@dataclass(slots=True)
class Task:
    id: str
    key: tuple[int, int, int]  # project, region, index
    task_type: str
    created: float  # wall clock
    deadline: float | None  # monotonic; None: never ends
    end_state: str
    set_tags: dict[str, str] | None
    state: str = "RUNNING"
    finished: float | None = None  # wall clock

    def api(self) -> dict[str, Any]:
        project_id, region_id, _ = self.key
        return {
            "id": self.id,
            "state": self.state,
            "task_type": self.task_type,
            "error": "task failed: image backend error" if self.state == "ERROR" else None,
            "created_on": iso(self.created),
            "updated_on": iso(self.finished or self.created),
            "finished_on": iso(self.finished) if self.finished is not None else None,
            "user_id": 9001,
            "client_id": 4242,
            "project_id": project_id,
            "region_id": region_id,
            "request_id": self.id.replace("-", "")[:24],
            "data": None,
            "created_resources": None,
            "detailed_state": self.state if self.state != "RUNNING" else None,
            "acknowledged_at": None,
            "acknowledged_by": None,
            "job_id": None,
            "schedule_id": None,
            "user_client_id": 4242,
        }


_CACHE_MAX = 64


class Store:
    """Images and tasks of one simulator; all methods run on the simulator's event loop."""

    def __init__(self, n: int, seed: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.demo = Demo(n, seed)
        self.n = n
        self._clock = clock
        self._rng = random.Random(seed ^ 0xADD)
        self._recs: dict[int, Rec | None] = {}  # changed demo images and added ones; None: deleted
        self._ids: dict[str, int] = {}  # ids of added images
        self._added: dict[tuple[int, int], list[int]] = {}
        self._next = n
        self.tasks: dict[str, Task] = {}
        self._due: list[tuple[float, str]] = []  # heap of (deadline, task id)
        # per (project, region): bumped when membership (add/delete) or contents change
        self._struct: dict[tuple[int, int], int] = {}
        self._data: dict[tuple[int, int], int] = {}
        self._stored: dict[tuple[int, int], set[int]] = {}  # indices in _recs, per place
        # list caches: key -> (version, indices)
        self._fixed_cache: dict[Any, tuple[Any, list[int]]] = {}
        self._base_cache: dict[Any, tuple[Any, list[int]]] = {}
        self._live_cache: dict[Any, tuple[Any, list[int]]] = {}

    # -- lookup ---------------------------------------------------------------------------
    def check_scope(self, project_id: int, region_id: int) -> None:
        if project_id not in PROJECT_IDS:
            raise ApiFault(404, f"Project {project_id} not found", "ProjectNotFound")
        if region_id not in REGION_NAMES:
            raise ApiFault(404, f"Region {region_id} not found", "RegionNotFound")

    def index(self, project_id: int, region_id: int, image_id: str) -> int:
        """The index of an existing image at this place, or ApiFault 404."""
        i = self._ids.get(image_id)
        if i is None:
            i = self.demo.index_of(image_id)
        if i is not None:
            rec = self._recs.get(i, False) if i < self.n else self._recs.get(i)
            if rec is not None and self._combo(i, rec) == (project_id, region_id):
                return i
        self.check_scope(project_id, region_id)
        raise ApiFault(404, f"Image {image_id} not found", "ImageNotFound")

    def _combo(self, i: int, rec: Rec | bool | None) -> tuple[int, int]:
        if isinstance(rec, Rec):
            return rec.doc["project_id"], rec.doc["region_id"]
        return self.demo.combo_of(i)

    def rec(self, i: int) -> Rec:
        """The image at index ``i`` (a fresh one for an unchanged demo image: not stored)."""
        rec = self._recs.get(i)
        if rec is not None:
            return rec
        b = self.demo.base(i)
        tags, ro = self.demo.tags(b)
        return Rec(i, self.demo.fields(i, b), tags, ro)

    def stored(self, i: int, rec: Rec | None = None) -> Rec:
        """The image at ``i`` (``rec``, if just read), kept from now on: it is about to change."""
        kept = self._recs.get(i)
        if kept is None:
            kept = rec if rec is not None else self.rec(i)
            self._recs[i] = kept
            self._stored.setdefault(self.demo.combo_of(i), set()).add(i)
        return kept

    def entries(self) -> Iterator[tuple[tuple[int, int], int]]:
        """Every existing image as ((project, region), index), in list order."""
        for combo, block in self.demo.blocks.items():
            for i in block:
                if self._recs.get(i, False) is not None:
                    yield combo, i
            for i in self._added.get(combo, ()):
                yield combo, i

    # -- change ---------------------------------------------------------------------------
    def add(
        self,
        project_id: int,
        region_id: int,
        *,
        name: str,
        tags: Mapping[str, str],
        read_only: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> str:
        self.check_scope(project_id, region_id)
        image_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        now = time.time()
        doc: dict[str, Any] = {
            "created_at": iso(now),
            "disk_format": "qcow2",
            "id": image_id,
            "min_disk": 5,
            "min_ram": 0,
            "name": name,
            "os_distro": "ubuntu",
            "os_type": "linux",
            "os_version": "22.04",
            "project_id": project_id,
            "region": REGION_NAMES[region_id],
            "region_id": region_id,
            "size": 2361393152,
            "status": "active",
            "updated_at": iso(now),
            "visibility": "private",
            "architecture": "x86_64",
            "creator_task_id": None,
            "description": None,
            "display_order": None,
            "gpu_driver": None,
            "gpu_driver_type": None,
            "gpu_driver_version": None,
            "hw_firmware_type": "bios",
            "hw_machine_type": "q35",
            "is_baremetal": False,
            "ssh_key": "allow",
            "task_id": None,
        }
        for bad in ("id", "project_id", "region_id", "region", "tags", "tags_v2"):
            if bad in fields:
                raise ValueError(f"add_image: {bad!r} is set by the simulator")
        doc.update(fields)
        all_tags = dict(tags)
        all_tags.update(read_only or {})
        i = self._next
        self._next += 1
        self._recs[i] = Rec(i, doc, all_tags, frozenset(read_only or ()))
        self._ids[image_id] = i
        combo = (project_id, region_id)
        self._added.setdefault(combo, []).append(i)
        self._stored.setdefault(combo, set()).add(i)
        self._bump_struct(combo)
        return image_id

    def delete(self, i: int) -> None:
        rec = self._recs.get(i)
        combo = self._combo(i, rec)
        if i < self.n:
            self._recs[i] = None
        else:
            self._recs.pop(i, None)
            if rec is not None:
                self._ids.pop(rec.doc["id"], None)
            self._added[combo].remove(i)
        self._stored.get(combo, set()).discard(i)
        self._bump_struct(combo)

    def _bump_struct(self, combo: tuple[int, int]) -> None:
        self._struct[combo] = self._struct.get(combo, 0) + 1

    def _bump_data(self, combo: tuple[int, int]) -> None:
        self._data[combo] = self._data.get(combo, 0) + 1

    def patch(self, i: int, body: Any) -> Rec:
        """Validate and apply a PATCH body to the existing image ``i``; the stored image.

        Order of checks (after the 404 of ``index``): 400 for the body's shape, 403 for a
        public image, 409 for a running task, 400 for a read-only tag; then the change.
        """
        fields, tags_patch, tags_null = validate_patch(body)
        rec = self.rec(i)
        image_id = rec.doc["id"]
        if rec.doc["visibility"] == "public":
            raise ApiFault(
                403,
                f"Image {image_id} is public: public images cannot be modified",
                "ForbiddenError",
            )
        task_id = rec.doc.get("task_id")
        task = self.tasks.get(task_id) if task_id is not None else None
        if task is not None and task.state == "RUNNING":
            raise ApiFault(
                409,
                f"Image {image_id} is locked by task {task_id}; try again when it has finished",
                "ResourceLockedError",
                task_id=task_id,
            )
        if tags_patch:
            ro = sorted(k for k in tags_patch if k in rec.ro)
            if ro:
                raise ApiFault(
                    400,
                    f"Tag(s) {', '.join(ro)} are read-only and cannot be changed or removed",
                    "ReadOnlyTagError",
                )
        rec = self.stored(i, rec)
        doc = rec.doc
        doc.update(fields)
        if tags_null:
            rec.tags = {k: v for k, v in rec.tags.items() if k in rec.ro}
        elif tags_patch:
            tags = rec.tags
            for k, v in tags_patch.items():
                if v is None:
                    tags.pop(k, None)
                else:
                    tags[k] = v
        doc["updated_at"] = iso(time.time())
        rec.json = None
        self._bump_data((doc["project_id"], doc["region_id"]))
        return rec

    # -- tasks ----------------------------------------------------------------------------
    def lock(
        self,
        i: int,
        seconds: float | None,
        *,
        end_state: str = "FINISHED",
        set_tags: Mapping[str, str] | None = None,
        task_type: str = "update_image",
    ) -> str:
        """Start a RUNNING task holding image ``i``; it ends after ``seconds`` (None: never).

        A lock on an image that is already locked takes the lock over; the older task still
        ends on time, but changes nothing.
        """
        if end_state not in TASK_END_STATES:
            raise ValueError(f"end_state must be FINISHED or ERROR, not {end_state!r}")
        rec = self.stored(i)
        task_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        now = self._clock()
        deadline = None if seconds is None else now + max(0.0, seconds)
        project_id, region_id = self._combo(i, rec)
        task = Task(
            task_id,
            (project_id, region_id, i),
            task_type,
            time.time(),
            deadline,
            end_state,
            dict(set_tags) if set_tags else None,
        )
        self.tasks[task_id] = task
        rec.doc["task_id"] = task_id
        rec.json = None
        if deadline is not None:
            heapq.heappush(self._due, (deadline, task_id))
        return task_id

    def settle(self) -> None:
        """End every task whose time has come (state is computed on access, not by timers)."""
        due = self._due
        if not due:
            return
        now = self._clock()
        while due and due[0][0] <= now:
            deadline, task_id = heapq.heappop(due)
            task = self.tasks[task_id]
            if task.state == "RUNNING":  # not ended early (finish_now)
                self._finish(task, time.time() - (now - deadline))

    def finish_now(self, task_id: str) -> None:
        """End a RUNNING task at once (its ``end_state``, its ``set_tags``); an ended one stays."""
        task = self.task(task_id)
        if task.state == "RUNNING":
            self._finish(task, time.time())

    def _finish(self, task: Task, wall: float) -> None:
        task.state = task.end_state
        task.finished = wall
        project_id, region_id, i = task.key
        rec = self._recs.get(i)
        if rec is None or rec.doc.get("task_id") != task.id:
            return
        rec.doc["task_id"] = None
        if task.set_tags:
            rec.tags.update(task.set_tags)
        rec.doc["updated_at"] = iso(wall)
        rec.json = None
        self._bump_data((project_id, region_id))

    def task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiFault(404, f"Task {task_id} not found", "TaskNotFound")
        return task

    # -- list -----------------------------------------------------------------------------
    def matching(self, project_id: int, region_id: int, flt: Filter) -> list[int]:
        """Indices of the images at this place that pass ``flt``, in list order.

        Fixed fields never change, so their matches are cached until an image is added or
        deleted here. For name and tag filters, the matches among unchanged demo images are
        cached the same way, and the stored (changed or added) images are checked live.
        """
        combo = (project_id, region_id)
        struct = self._struct.get(combo, 0)
        fixed = self._cached(self._fixed_cache, (combo, flt.fixed()), struct)
        if fixed is None:
            fixed = self._scan_fixed(combo, flt)
            self._fixed_cache[(combo, flt.fixed())] = (struct, fixed)
        if not flt.changeable():
            return fixed
        version = (struct, self._data.get(combo, 0))
        found = self._cached(self._live_cache, (combo, flt), version)
        if found is not None:
            return found
        hits = self._cached(self._base_cache, (combo, flt), struct)
        if hits is None:
            hits = [i for i in fixed if i < self.n and self._base_match(i, flt)]
            self._base_cache[(combo, flt)] = (struct, hits)
        recs = self._recs
        found = [i for i in hits if i not in recs]
        live = []
        for i in self._stored.get(combo, ()):
            rec = recs.get(i)
            if rec is not None and _match(rec, flt):
                live.append(i)
        if live:
            found.extend(live)
            found.sort()
        self._live_cache[(combo, flt)] = (version, found)
        return found

    @staticmethod
    def _cached(
        cache: dict[Any, tuple[Any, list[int]]], key: Any, version: Any
    ) -> list[int] | None:
        entry = cache.get(key)
        if entry is not None and entry[0] == version:
            return entry[1]
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        return None

    def _scan_fixed(self, combo: tuple[int, int], flt: Filter) -> list[int]:
        recs = self._recs
        block = self.demo.blocks[combo]
        if flt.fixed() == (None, None, None, None):
            out = list(block)
        else:
            out = self.demo.select(
                block,
                lambda o: flt.match_os(o.os_distro, o.os_version, o.architecture),
                flt.match_visibility,
            )
        if recs:
            out = [i for i in out if recs.get(i, False) is not None]
        for i in self._added.get(combo, ()):
            rec = recs[i]
            if rec is not None and _match_fixed(rec, flt):
                out.append(i)
        return out

    def _base_match(self, i: int, flt: Filter) -> bool:
        b = self.demo.base(i)
        name = self.demo.name(i, b) if flt.name is not None else ""
        tags = self.demo.tags(b)[0] if flt.tag_keys or flt.tag_values else {}
        return flt.match_changeable(name, tags)


def _match_fixed(rec: Rec, flt: Filter) -> bool:
    d = rec.doc
    return flt.match_visibility(d["visibility"]) and flt.match_os(
        d["os_distro"], d["os_version"], d.get("architecture")
    )


def _match(rec: Rec, flt: Filter) -> bool:
    return _match_fixed(rec, flt) and flt.match_changeable(rec.doc["name"], rec.tags)


def validate_patch(body: Any) -> tuple[dict[str, Any], dict[str, str | None] | None, bool]:
    """Check a PATCH body: (fields to set, the tags merge patch, whether ``tags`` was null).

    Raises ApiFault 400 naming the first problem found.
    """
    if not isinstance(body, dict):
        raise ApiFault(400, "Request body must be a JSON object", "ValidationError")
    unknown = sorted(set(body) - PATCH_FIELDS)
    if unknown:
        raise ApiFault(
            400,
            f"Unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(PATCH_FIELDS))}",
            "ValidationError",
        )
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if name == "tags":
            continue
        if name == "name":
            if not isinstance(value, str):
                raise _invalid("name", "must be a string")
            if not 1 <= len(value) <= NAME_MAX:
                raise _invalid("name", f"must be 1 to {NAME_MAX} characters long")
            fields[name] = value
        elif name == "is_baremetal":
            if value is not None and not isinstance(value, bool):
                raise _invalid(name, "must be a boolean")
            fields[name] = bool(value)
        else:
            allowed = PATCH_ENUMS[name]
            if not isinstance(value, str) or value not in allowed:
                raise _invalid(name, f"must be one of {', '.join(sorted(allowed))}, not {value!r}")
            fields[name] = value
    if "tags" not in body:
        return fields, None, False
    tags = body["tags"]
    if tags is None:
        return fields, None, True
    if not isinstance(tags, dict):
        raise _invalid("tags", "must be an object of key: value (or null)")
    for key, value in tags.items():
        if key not in _GOOD_TAGS:
            problem = tag_problem(key)
            if problem:
                raise _invalid("tags", f"key {key!r} {problem}")
            _remember_good(key)
        if value is not None and value not in _GOOD_TAGS:
            problem = tag_problem(value)
            if problem:
                raise _invalid("tags", f"value of {key!r} {problem}")
            _remember_good(value)
    return fields, tags, False


# Tag keys and values already found valid: a bulk run sends the same few again and again.
_GOOD_TAGS: set[str] = set()


def _remember_good(text: str) -> None:
    if len(_GOOD_TAGS) >= 4096:
        _GOOD_TAGS.clear()
    _GOOD_TAGS.add(text)


def _invalid(field: str, problem: str) -> ApiFault:
    return ApiFault(400, f"Validation error: body.{field}: {problem}", "ValidationError")


_dumps = json.JSONEncoder(separators=(",", ":")).encode

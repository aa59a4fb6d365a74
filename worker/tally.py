"""A run's record added up for a person: failures by reason and HTTP status, skips by reason,
what changed per key, the first changes in full. One pass over the results
(``Journal.iter_results(raw=True)``: the journal's rows, or a finished run's
results.jsonl.gz), in memory that does not grow with the number of targets: counts, and at
most ``MAX_KEYS`` groups of ``images`` names and ``MESSAGES`` messages each, and ``diffs``
changes.

``KeyTally`` is the per-key count alone (set, removed, renamed: read off the merge patch and
the state it was sent to), for any caller that has (before, patch) pairs.
"""

from __future__ import annotations

import builtins
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

#: a results row's fields by position (models.RESULT_FIELDS)
_IMAGE, _NAME, _STATUS, _REASON, _BEFORE, _PATCH, _HTTP, _ERROR = 3, 4, 5, 6, 7, 9, 11, 14

#: how many distinct messages a failure group keeps, and how much of each
MESSAGES = 3
MESSAGE_CHARS = 500
#: past this many keys (or failure groups) the rest are counted together
MAX_KEYS = 200
#: distinct old values a key remembers (past it, the aggregate says "at least")
MAX_VALUES = 1000


def _obj(value: Any) -> dict[str, Any]:
    """A row's ``before``/``patch``: JSON text (the journal) or already decoded (the gzip)."""
    if isinstance(value, str | bytes):
        value = orjson.loads(value)
    return value if isinstance(value, dict) else {}


@dataclass
class KeyCounts:
    set: int = 0
    removed: int = 0
    renamed: Counter[str] = field(default_factory=Counter)  # new key -> images
    added: int = 0  # of ``set``: on images that had no such key (or field)
    old_values: builtins.set[str] = field(default_factory=builtins.set)  # the others held
    kept: int = 0  # add_tags: images whose key holds another value, left as it is

    @property
    def total(self) -> int:
        return self.set + self.removed + sum(self.renamed.values())

    def setting(self, old: Any) -> None:
        self.set += 1
        if old is None:
            self.added += 1
        elif len(self.old_values) < MAX_VALUES:
            self.old_values.add(str(old))

    def describe(self) -> str:
        """``set on 46 (added on 40; changed on 6, from 3 distinct values); removed on 2``."""
        parts = []
        if self.set:
            changed = self.set - self.added
            many = len(self.old_values)
            values = f"{'at least ' if many >= MAX_VALUES else ''}{many:,} distinct value" + (
                "" if many == 1 else "s")
            detail = [f"added on {self.added:,}"] if self.added else []
            if changed:
                detail.append(f"changed on {changed:,}, from {values}")
            parts.append(f"set on {self.set:,} ({'; '.join(detail)})")
        if self.removed:
            parts.append(f"removed on {self.removed:,}")
        parts.extend(f"renamed to {new} on {n:,}" for new, n in self.renamed.most_common())
        if self.kept:
            parts.append(f"kept on {self.kept:,} (add_tags: the image holds another value)")
        return "; ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {"set": self.set, "added": self.added, "changed": self.set - self.added,
                "from_distinct_values": len(self.old_values), "removed": self.removed,
                "renamed": dict(self.renamed), "kept": self.kept}


class KeyTally:
    """Per key (a tag's key, or ``field:<name>`` for a field such as ssh_key): on how many
    images it was set, removed, or renamed (and to what). A tag removed while another is set
    to its value, where the image had no such tag, is a rename."""

    def __init__(self, limit: int = MAX_KEYS) -> None:
        self.keys: dict[str, KeyCounts] = {}
        self.limit = limit
        self.other_keys = 0  # changes to keys past ``limit``
        self.images = 0

    def _counts(self, key: str) -> KeyCounts | None:
        counts = self.keys.get(key)
        if counts is None and len(self.keys) < self.limit:
            counts = self.keys[key] = KeyCounts()
        return counts

    def add(self, before: Mapping[str, Any], patch: Mapping[str, Any],
            kept: Mapping[str, str] | None = None) -> None:
        """One image's change; ``kept``: its ``add_tags``, a key of which the image holds
        with another value (and the patch leaves) is counted ``kept``."""
        if kept:
            tags, sent = before.get("tags") or {}, patch.get("tags") or {}
            for key, value in kept.items():
                if (tags.get(key, value) != value and key not in sent
                        and (counts := self._counts(key)) is not None):
                    counts.kept += 1
        if not patch:
            return
        self.images += 1
        for name, value in patch.items():
            if name == "tags" and isinstance(value, Mapping):
                self._add_tags(before.get("tags") or {}, value)
            elif (counts := self._counts(f"field:{name}")) is not None:
                if value is None:
                    counts.removed += 1
                else:
                    counts.setting(before.get(name))
            else:
                self.other_keys += 1

    def _add_tags(self, old: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        renames: dict[str, str] = {}  # old key -> new key
        new_keys = [k for k, v in tags.items() if v is not None and k not in old]
        for key, value in tags.items():
            if value is None and key in old:
                target = next((k for k in new_keys if tags[k] == old[key]
                               and k not in renames.values()), None)
                if target is not None:
                    renames[key] = target
        targets = set(renames.values())
        for key, value in tags.items():
            if key in targets:
                continue  # counted as its old key's rename
            counts = self._counts(str(key))
            if counts is None:
                self.other_keys += 1
            elif key in renames:
                counts.renamed[str(renames[key])] += 1
            elif value is None:
                counts.removed += 1
            else:
                counts.setting(old.get(key))

    def rows(self) -> list[tuple[str, KeyCounts]]:
        """(key, counts) with any change, most changed first."""
        return sorted(((k, c) for k, c in self.keys.items() if c.total or c.kept),
                      key=lambda kc: (-kc[1].total, kc[0]))

    def lines(self) -> list[str]:
        """A plan's changes in aggregate, a line a key: ``tags.owner: set on 46 (...)``."""
        out = [f"{_shown(key)}: {counts.describe()}" for key, counts in self.rows()]
        if self.other_keys:
            out.append(f"and {self.other_keys:,} changes to further keys")
        return out

    def as_json(self) -> dict[str, Any]:
        """The same, for ``summary.json`` (``changes_per_key``)."""
        return {_shown(key): counts.as_json() for key, counts in self.rows()}


def _shown(key: str) -> str:
    """``field:ssh_key`` as ``ssh_key``, a tag key as ``tags.<key>``."""
    return key.removeprefix("field:") if key.startswith("field:") else f"tags.{key}"


@dataclass
class FailureGroup:
    """The targets of one status that share a reason (and, failed, an HTTP status): how many,
    the first distinct messages, the first images."""

    reason: str
    http_status: int | None
    count: int = 0
    messages: list[str] = field(default_factory=list)
    #: (name, image id) of the first images
    images: list[tuple[str, str]] = field(default_factory=list)


class Groups:
    """Targets grouped by (reason, HTTP status): at most ``MAX_KEYS`` groups (the rest counted
    in ``other``), ``images`` names and ``MESSAGES`` messages each."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.groups: dict[tuple[str, int | None], FailureGroup] = {}
        self.other = 0  # targets past the groups' cap
        self.count = 0

    def add(self, reason: str, http: int | None, message: str, name: str,
            image_id: str) -> None:
        self.count += 1
        key = (reason, http)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= MAX_KEYS:
                self.other += 1
                return
            group = self.groups[key] = FailureGroup(*key)
        group.count += 1
        message = message[:MESSAGE_CHARS]
        if message and len(group.messages) < MESSAGES and message not in group.messages:
            group.messages.append(message)
        if len(group.images) < self.images:
            group.images.append((name, image_id))

    def largest_first(self) -> list[FailureGroup]:
        return sorted(self.groups.values(),
                      key=lambda g: (-g.count, g.reason, g.http_status or 0))


@dataclass
class Tally:
    """The run's results added up (``add`` each row, or ``of`` them all): failed and skipped
    targets by reason, the others' reasons counted, the changes per key and the first in
    full."""

    images: int = 100  # names kept per failure or skip group
    diffs: int = 50  # changes kept in full
    changed: frozenset[str] = frozenset({"updated"})  # statuses whose patch counts
    failed: Groups = field(init=False)
    skipped: Groups = field(init=False)
    #: "<status>: <reason>" of the targets neither changed, failed nor skipped (unchanged)
    reasons: Counter[str] = field(default_factory=Counter)
    keys: KeyTally = field(default_factory=KeyTally)
    samples: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    rows: int = 0

    def __post_init__(self) -> None:
        self.failed = Groups(self.images)
        self.skipped = Groups(self.images)

    @classmethod
    def of(cls, rows: Iterable[tuple[Any, ...]], **kwargs: Any) -> Tally:
        tally = cls(**kwargs)
        for row in rows:
            tally.add(row)
        return tally

    def add(self, row: tuple[Any, ...]) -> None:
        self.rows += 1
        status = row[_STATUS]
        if status in ("failed", "skipped"):
            http = row[_HTTP]
            (self.failed if status == "failed" else self.skipped).add(
                str(row[_REASON] or "unknown"),
                int(http) if isinstance(http, int) and status == "failed" else None,
                str(row[_ERROR] or ""), str(row[_NAME] or ""), str(row[_IMAGE]))
        elif status in self.changed:
            patch = _obj(row[_PATCH])
            if patch:
                keep = len(self.samples) < self.diffs
                tags = patch.get("tags")
                # the state is read only where it tells something: a removal may be a rename
                needs = keep or (isinstance(tags, dict) and None in tags.values())
                before = _obj(row[_BEFORE]) if needs else {}
                self.keys.add(before, patch)
                if keep:
                    self.samples.append((str(row[_NAME] or ""), str(row[_IMAGE]), before, patch))
        elif row[_REASON] and status != "updated":
            key = f"{status}: {row[_REASON]}"
            if key in self.reasons or len(self.reasons) < MAX_KEYS:
                self.reasons[key] += 1

    def failure_groups(self) -> list[FailureGroup]:
        """Largest first."""
        return self.failed.largest_first()

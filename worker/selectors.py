"""Selectors: the job's targets as an async stream of ``Target``s with their current state.

- Query selectors are expanded page by page through the images list; each page carries the
  images' state, so a query costs one GET per page. ``projects: all`` and ``regions: all``
  expand through their list endpoints. Server-side filters go in the query string, the
  client-side ones (name_glob, name_regex, has_tags, missing_tags) apply after. Up to
  ``READ_AHEAD`` pages are read at once, across regions, while earlier ones are planned.
- Selector files are read as streams into a small staging SQLite file beside the run (never
  into memory). A row's state is then fetched in bulk: per project and region, where listing
  the region costs fewer requests than one GET per row, the region is listed once and joined
  against the staged rows; otherwise (or for rows the listing did not show) one GET a row.
  A row naming an image that does not exist comes out with ``image=None``.
- Each image comes out once per run, whatever the number of selectors naming it: the
  staging file remembers what was emitted, and a file row for an image a query also matched
  adds its changes to the job's (the row wins on the same key).
- ``Shard(i, n)`` keeps only images whose stable hash of the id falls to shard i.
- ``Known`` carries the projects and regions lists read before the run began
  (``worker.preflight``), which expand ``all``. ``Expander.matched`` counts, per selector,
  the images it matched (a row: its image exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import tempfile
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from worker import defaults, fanout, retry, spec
from worker.api import Client
from worker.errors import BadAnswer, JobError, NotFound
from worker.log import get_logger
from worker.models import Changes, Image, Target, changes_from_json, changes_to_json
from worker.safety import create_private_file, image_id_problem

log = get_logger("bulk_tagger.selectors")
T = TypeVar("T")

#: Rows per staging transaction and per read-back chunk.
_CHUNK = 2000
#: Below this many rows in a region, one GET a row always beats listing.
_MIN_ROWS_FOR_LIST = 3
#: List requests in flight at once while expanding (at most the job's concurrency).
READ_AHEAD = 4


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): a stable split of images by id."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise JobError(
                f"shard {self.index}/{self.count} is out of range",
                field="--shard",
                hint="I/N with 0 <= I < N, e.g. 0/4",
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise JobError(
                f"not a shard: {text!r}", field="--shard", hint="I/N, e.g. 0/4"
            ) from None
        return cls(index, count)

    def owns(self, image_id: str) -> bool:
        return zlib.crc32(image_id.encode()) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(slots=True)
class Known:
    """The ids the API lists (None: not read)."""

    projects: list[int] | None = None
    regions: list[int] | None = None


def listed_ids(items: Iterable[Mapping[str, Any]], kind: str) -> list[int]:
    """The ids of a projects or regions list (``kind``); BadAnswer if one is not a number."""
    ids = [item["id"] for item in items if "id" in item]
    if not all(type(i) is int for i in ids):
        raise BadAnswer(f"the list of {kind} holds an id that is not a number", status=200)
    return ids


def selector_label(number: int, selector: spec.QuerySelector | spec.FileSelector) -> str:
    """How the summary names a job's selector (``number`` counts from 1)."""
    if isinstance(selector, spec.FileSelector):
        return f"file {selector.file}"
    return f"query {number}"


def _disagree(old: Changes, new: Changes) -> str | None:
    """How two rows naming one image contradict each other (None where they agree)."""
    for key, value in new.set_tags.items():
        if key in old.remove_tags:
            return f"sets tag {key!r}, removed"
        if old.set_tags.get(key, value) != value:
            return f"sets tag {key!r} to {value!r}, not {old.set_tags[key]!r},"
    for key in new.remove_tags:
        if key in old.set_tags:
            return f"removes tag {key!r}, set"
    for name, field_value in new.set_fields.items():
        if old.set_fields.get(name, field_value) != field_value:
            return f"sets {name} to {field_value!r}, not {old.set_fields[name]!r},"
    return None


def check_rows_agree(job: spec.Job, *, env: Mapping[str, str] | None = None) -> None:
    """``bulk-tagger validate``: the selector files' rows staged as a plan stages them (in a
    temporary file: flat memory), so rows naming one image that contradict each other are a
    JobError naming both lines before any plan."""
    if not job.file_selectors:
        return
    with tempfile.TemporaryDirectory(prefix="bulk-tagger-") as folder:
        stage = _Stage(Path(folder) / "stage.sqlite")
        try:
            for selector in job.file_selectors:
                stage.add_rows(spec.iter_rows(job, selector, env=env), None)
        finally:
            stage.close()


class _Stage:
    """The staging file: file rows waiting for their state, and the keys already emitted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        create_private_file(path)  # 0600 like the journal, never through a symlink
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.executescript(
            "CREATE TABLE rows (p INTEGER, r INTEGER, id TEXT, changes TEXT, source TEXT,"
            " done INTEGER DEFAULT 0, PRIMARY KEY (p, r, id)) WITHOUT ROWID;"
            "CREATE TABLE seen (p INTEGER, r INTEGER, id TEXT, PRIMARY KEY (p, r, id))"
            " WITHOUT ROWID;"
        )
        self.rows = 0
        #: selector files with rows of images another shard owns
        self.elsewhere: set[str] = set()

    def close(self) -> None:
        self.conn.close()
        self.path.unlink(missing_ok=True)

    def add_rows(self, rows: Iterable[spec.Row], shard: Shard | None) -> None:
        conn = self.conn
        batch: list[spec.Row] = []

        def flush() -> None:
            conn.execute("BEGIN")
            for row in batch:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO rows (p, r, id, changes, source) VALUES (?,?,?,?,?)",
                    (row.project_id, row.region_id, row.image_id,
                     changes_to_json(row.changes), f"{row.file}:{row.line}"),
                )
                if cur.rowcount == 0:  # named twice: the rows' changes add up, if they agree
                    old, where = conn.execute(
                        "SELECT changes, source FROM rows WHERE p=? AND r=? AND id=?",
                        (row.project_id, row.region_id, row.image_id),
                    ).fetchone()
                    earlier = changes_from_json(old)
                    clash = _disagree(earlier, row.changes)
                    if clash is not None:
                        conn.execute("ROLLBACK")
                        raise JobError(
                            f"image {row.image_id} is named again, and {clash} than at {where}",
                            file=row.file, line=row.line, field="image_id",
                            hint="one row an image, or rows that agree",
                        )
                    merged = earlier.merged(row.changes)
                    conn.execute(
                        "UPDATE rows SET changes=? WHERE p=? AND r=? AND id=?",
                        (changes_to_json(merged), row.project_id, row.region_id, row.image_id),
                    )
                else:
                    self.rows += 1
            conn.execute("COMMIT")
            batch.clear()

        for row in rows:
            if shard is not None and not shard.owns(row.image_id):
                self.elsewhere.add(row.file)
                continue
            batch.append(row)
            if len(batch) >= _CHUNK:
                flush()
        if batch:
            flush()

    def add_keys(self, keys: Iterable[tuple[int, int, str, str]]) -> None:
        """Stage ``(project, region, image, source)`` rows without changes of their own."""
        batch: list[tuple[int, int, str, str]] = []
        for key in keys:
            batch.append(key)
            if len(batch) >= _CHUNK:
                self._insert_keys(batch)
        if batch:
            self._insert_keys(batch)

    def _insert_keys(self, batch: list[tuple[int, int, str, str]]) -> None:
        self.conn.execute("BEGIN")
        cur = self.conn.executemany(
            "INSERT OR IGNORE INTO rows (p, r, id, changes, source) VALUES (?,?,?,'{}',?)", batch)
        self.rows += cur.rowcount
        self.conn.execute("COMMIT")
        batch.clear()

    def claim(
        self, project_id: int, region_id: int, ids: list[str]
    ) -> tuple[set[str], dict[str, tuple[str, str]]]:
        """Mark ``ids`` emitted. Returns (ids emitted before, file rows of the others)."""
        conn = self.conn
        marks = ",".join("?" * len(ids))
        seen = {
            i for (i,) in conn.execute(
                f"SELECT id FROM seen WHERE p=? AND r=? AND id IN ({marks})",
                (project_id, region_id, *ids),
            )
        }
        fresh = [i for i in ids if i not in seen]
        rows: dict[str, tuple[str, str]] = {}
        if fresh:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT OR IGNORE INTO seen (p, r, id) VALUES (?,?,?)",
                [(project_id, region_id, i) for i in fresh],
            )
            if self.rows:
                marks = ",".join("?" * len(fresh))
                for i, changes, source in conn.execute(
                    f"SELECT id, changes, source FROM rows WHERE p=? AND r=? AND done=0"
                    f" AND id IN ({marks})",
                    (project_id, region_id, *fresh),
                ).fetchall():
                    rows[i] = (changes, source)
                if rows:
                    conn.executemany(
                        "UPDATE rows SET done=1 WHERE p=? AND r=? AND id=?",
                        [(project_id, region_id, i) for i in rows],
                    )
            conn.execute("COMMIT")
        return seen, rows

    def groups(self) -> list[tuple[int, int, int]]:
        return [
            (p, r, n) for p, r, n in self.conn.execute(
                "SELECT p, r, COUNT(*) FROM rows WHERE done=0 GROUP BY p, r ORDER BY p, r"
            )
        ]

    def take(self, project_id: int, region_id: int, limit: int) -> list[tuple[str, str, str]]:
        """Up to ``limit`` waiting rows of a region, marked done."""
        rows = self.conn.execute(
            "SELECT id, changes, source FROM rows WHERE p=? AND r=? AND done=0 LIMIT ?",
            (project_id, region_id, limit),
        ).fetchall()
        if rows:
            self.conn.executemany(
                "UPDATE rows SET done=1 WHERE p=? AND r=? AND id=?",
                [(project_id, region_id, i) for i, _, _ in rows],
            )
        return rows


class Expander:
    """Expands a job's selectors (``targets``), or reads given images again (``reread``, which
    needs no job). ``requests`` are counted by the client."""

    def __init__(
        self,
        job: spec.Job | None,
        client: Client,
        *,
        stage_path: Path,
        policy: retry.RetryPolicy,
        concurrency: int = defaults.CONCURRENCY,
        shard: Shard | None = None,
        env: Mapping[str, str] | None = None,
        on_retry: Callable[[BaseException, float], None] | None = None,
        page_size: int | None = None,
        known: Known | None = None,
    ) -> None:
        self.job = job
        self.known = known or Known()
        #: images matched, per selector label (``selector_label``): a row's image exists
        numbered = list(enumerate(job.targets, start=1)) if job else []
        self.matched: Counter[str] = Counter({selector_label(n, t): 0 for n, t in numbered})
        #: selectors that matched images (rows: named them) another shard owns: a match for
        #: require_matches all the same, as that shard changes them
        self.elsewhere: set[str] = set()
        #: progress while planning: images read (list pages' and file rows'), and how many
        #: there are to read as far as the lists' counts and the staged rows say so far
        self.read = 0
        self.expected = 0
        self._file_labels = {
            t.file: selector_label(n, t)
            for n, t in reversed(numbered) if isinstance(t, spec.FileSelector)
        }
        self.client = client
        self.stage_path = stage_path
        self._read = retry.Reader(policy, on_retry)
        self.concurrency = max(1, concurrency)
        self.shard = shard
        self.env = env
        self.job_changes = job.changes_model() if job else Changes()
        self.page_size = page_size or (job.options.page_size if job else defaults.PAGE_SIZE)
        self.read_ahead = min(READ_AHEAD, self.concurrency)
        queries = sum(isinstance(s, spec.QuerySelector) for s in job.targets) if job else 0
        self.dedup = job is None or queries > 1 or queries < len(job.targets)

    async def _ids(self, value: list[int] | str, kind: str) -> list[int]:
        if not isinstance(value, str):
            return list(value)
        listed: list[int] | None = getattr(self.known, kind)
        if listed is None:
            fetch = self.client.list_projects if kind == "projects" else self.client.list_regions
            listed = listed_ids(await self._read(fetch), kind)
            setattr(self.known, kind, listed)
        return list(listed)

    def _count_row(self, source: str) -> None:
        label = self._file_labels.get(source.rpartition(":")[0])
        if label is not None:
            self.matched[label] += 1

    async def targets(self) -> AsyncIterator[Target]:
        job = self.job
        assert job is not None
        stage = _Stage(self.stage_path)
        try:
            for selector in job.targets:
                if isinstance(selector, spec.FileSelector):
                    stage.add_rows(spec.iter_rows(job, selector, env=self.env), self.shard)
            self.expected += stage.rows
            self.elsewhere.update(self._file_labels[f] for f in stage.elsewhere
                                  if f in self._file_labels)
            for number, selector in enumerate(job.targets, start=1):
                if isinstance(selector, spec.QuerySelector):
                    async for target in self._query(stage, selector.query, number):
                        yield target
            async for target in self._file_rows(stage):
                yield target
        finally:
            stage.close()

    async def reread(
        self, keys: Iterable[tuple[int, int, str, str]]
    ) -> AsyncIterator[tuple[str, Image | None]]:
        """The state now of each ``(project, region, image, tag)`` (a resumed run's pending
        targets), as ``(tag, image)``, image None where there is no such image. Read by the
        file rows' join: a region is listed where that costs fewer requests than one GET per
        key, the rest are read one GET each. Staged on disk, never held in memory."""
        stage = _Stage(self.stage_path)
        try:
            stage.add_keys(keys)
            async for target in self._file_rows(stage):
                yield target.source, target.image
        finally:
            stage.close()

    # -- queries ------------------------------------------------------------------------------
    async def _query(self, stage: _Stage, query: Any, number: int) -> AsyncIterator[Target]:
        projects, regions = await asyncio.gather(
            self._ids(query.projects, "projects"), self._ids(query.regions, "regions")
        )
        params = query.server_params()
        source = f"query {number}"
        match = query.matcher()
        shard = self.shard
        where = dict.fromkeys((p, r, 0) for p in projects for r in regions)
        async for project_id, region_id, page in self._pages(where, params, counted=True):
            self.read += len(page)
            matched = page if match is None else [i for i in page if match(i)]
            if shard is not None:
                mine = [image for image in matched if shard.owns(image.id)]
                if len(mine) < len(matched):
                    self.elsewhere.add(source)
                matched = mine
            self.matched[source] += len(matched)
            for target in self._emit(stage, project_id, region_id, matched, source):
                yield target

    async def _pages(
        self, regions: Iterable[tuple[int, int, int]], params: list[tuple[str, str]],
        *, counted: bool = False,
    ) -> AsyncIterator[tuple[int, int, list[Image]]]:
        """``(project_id, region_id, page)`` for each distinct ``(project_id, region_id,
        offset)`` of ``regions``: that region's list from ``offset``, by limit/offset until
        ``count``.

        Up to ``read_ahead`` list requests are in flight at once (the list is not read one
        round trip at a time): once a region's ``count`` is known its next pages are asked,
        then the next regions' first pages. Pages come out in the order they were asked.
        Tolerant of a server that pages by fewer than ``limit`` (the first page's length is
        then the step) and of one that sends no ``count`` (one page at a time, until a short
        one). Not fooled by one that lies: a region's reading stops (with a warning) at a page
        that repeats an earlier one of it (the offset ignored), and its pages never reach
        past what its first ``count`` allowed (plus a page of slack for images added
        meanwhile), whatever later pages claim.
        """
        size = self.page_size
        client = self.client
        todo = iter(regions)
        flight: deque[tuple[int, int, int, asyncio.Future[tuple[list[Image], int | None]]]]
        flight = deque()
        # a region being read: [next offset to ask, where its list ends, step]; ``open_``
        # holds the ones with pages left to ask, in the order their first page came back
        state: dict[tuple[int, int], list[int]] = {}
        open_: deque[tuple[int, int]] = deque()
        gone: set[tuple[int, int]] = set()
        # a digest of each page of a region, and the most its list may hold
        pages: dict[tuple[int, int], set[int]] = {}
        ceiling: dict[tuple[int, int], int] = {}

        def fetch(p: int, r: int, at: int) -> Awaitable[tuple[list[Image], int | None]]:
            return self._read(
                lambda: client.list_images(p, r, params=params, limit=size, offset=at)
            )

        def ask() -> None:
            while len(flight) < self.read_ahead:
                if open_:
                    (p, r), region = open_[0], state[open_[0]]
                    at = region[0]
                    region[0] += region[2]
                    if region[0] >= region[1]:
                        open_.popleft()
                else:
                    nxt = next(todo, None)
                    if nxt is None:
                        return
                    p, r, at = nxt
                flight.append((p, r, at, asyncio.ensure_future(fetch(p, r, at))))

        def arrived(key: tuple[int, int], at: int, n: int, count: int | None) -> None:
            end = count if count is not None else at + n + (1 if n >= size else 0)
            if count is not None:
                end = min(end, ceiling.setdefault(key, count + size))
            region = state.get(key)
            if region is None:  # its first page: the step is what the server pages by
                region = state[key] = [at + n, 0, n if 0 < n < size and at + n < end else size]
                if counted and count is not None:  # ``counted``: a query's, for progress
                    self.expected += count
            was_open = region[0] < region[1]
            region[1] = end  # the latest page's word on the list's length
            if region[0] < end and not was_open:
                open_.append(key)
            elif was_open and region[0] >= end:
                open_.remove(key)

        def drop(key: tuple[int, int], event: str, **why: Any) -> None:
            """Read no more of a region: it is gone, or its paging went wrong."""
            gone.add(key)
            log.warning(event, project_id=key[0], region_id=key[1], **why)
            with contextlib.suppress(ValueError):
                open_.remove(key)

        try:
            ask()
            while flight:
                p, r, at, future = flight.popleft()
                key = (p, r)
                try:
                    page, count = await future
                except NotFound as exc:
                    if key not in gone:
                        drop(key, "selectors.region_not_found", error=exc.message)
                    ask()
                    continue
                if key in gone:  # a page of a region that vanished meanwhile
                    ask()
                    continue
                if page and not self._fresh_page(pages.setdefault(key, set()), page):
                    drop(key, "selectors.paging_stopped", offset=at,
                         reason="a page repeated an earlier one")
                    ask()
                    continue
                arrived(key, at, len(page), count)
                ask()
                if page:
                    yield p, r, page
        finally:
            for *_, future in flight:
                future.cancel()
            for *_, future in flight:
                with contextlib.suppress(BaseException):
                    await future

    @staticmethod
    def _fresh_page(earlier: set[int], page: list[Image]) -> bool:
        """False if ``page`` holds the very images of an earlier page of its region."""
        digest = hash(tuple(image.id for image in page))
        if digest in earlier:
            return False
        earlier.add(digest)
        return True

    def _emit(
        self,
        stage: _Stage,
        project_id: int,
        region_id: int,
        images: list[Image],
        source: str | None,
    ) -> list[Target]:
        """Targets for the images not emitted before, with their file rows' changes added."""
        if not images:
            return []
        if not self.dedup:
            # one query and no file: nothing else can name these images (a page shifted
            # by a concurrent change may repeat one; the journal keeps its first plan)
            return [Target(project_id, region_id, image.id, self.job_changes, image, source or "")
                    for image in images]
        seen, rows = stage.claim(project_id, region_id, [image.id for image in images])
        out = []
        job_changes = self.job_changes
        for image in images:
            if image.id in seen:
                continue
            changes = job_changes
            where = source or ""
            row = rows.get(image.id)
            if row is not None:
                self._count_row(row[1])
                changes = job_changes.merged(changes_from_json(row[0]))
                where = row[1] if source is None else f"{source} + {row[1]}"
            out.append(Target(project_id, region_id, image.id, changes, image, where))
        return out

    # -- file rows ----------------------------------------------------------------------------
    async def _file_rows(self, stage: _Stage) -> AsyncIterator[Target]:
        for project_id, region_id, waiting in stage.groups():
            if waiting >= _MIN_ROWS_FOR_LIST:
                async for target in self._join(stage, project_id, region_id, waiting):
                    self.read += 1
                    yield target
            async for target in self._get_each(stage, project_id, region_id):
                self.read += 1
                yield target

    async def _join(
        self, stage: _Stage, project_id: int, region_id: int, waiting: int
    ) -> AsyncIterator[Target]:
        """List the region and join it with the staged rows, when that is the cheaper way."""
        size = self.page_size
        client = self.client
        try:
            first, count = await self._read(
                lambda: client.list_images(project_id, region_id, limit=size, offset=0)
            )
        except NotFound:
            return  # the rows fall through to one GET each, which says not_found per row
        for target in self._join_page(stage, project_id, region_id, first):
            yield target
        pages = math.ceil(count / size) if count is not None else None
        if (pages is not None and pages - 1 > waiting) or (count is None and len(first) < size):
            return  # listing the rest costs more than a GET a row (the first page is used)
        if count is not None and len(first) >= count:
            return
        async for _, _, page in self._pages([(project_id, region_id, len(first))], []):
            for target in self._join_page(stage, project_id, region_id, page):
                yield target

    def _join_page(
        self, stage: _Stage, project_id: int, region_id: int, page: list[Image]
    ) -> list[Target]:
        if not page:
            return []
        marks = ",".join("?" * len(page))
        staged = {
            i for (i,) in stage.conn.execute(
                f"SELECT id FROM rows WHERE p=? AND r=? AND done=0 AND id IN ({marks})",
                (project_id, region_id, *(image.id for image in page)),
            )
        }
        wanted = [image for image in page if image.id in staged]
        return self._emit(stage, project_id, region_id, wanted, None)

    async def _get_each(
        self, stage: _Stage, project_id: int, region_id: int
    ) -> AsyncIterator[Target]:
        """One GET a waiting row (a missing image comes out with ``image=None``)."""

        def waiting() -> Iterator[tuple[str, str, str]]:
            # one batch's rows at a time, taken when the batch before them is done
            while rows := stage.take(project_id, region_id, self.concurrency * fanout.READ_AHEAD):
                yield from rows

        def get(row: tuple[str, str, str]) -> Awaitable[Target | None]:
            return self._get_row(stage, project_id, region_id, row)

        async for found in fanout.batches(get, waiting(), concurrency=self.concurrency):
            for target in found:
                if target is not None:
                    yield target

    async def _get_row(
        self, stage: _Stage, project_id: int, region_id: int, row: tuple[str, str, str]
    ) -> Target | None:
        image_id, changes_json, source = row
        seen, _ = stage.claim(project_id, region_id, [image_id])
        if image_id in seen:
            return None
        changes: Changes = self.job_changes.merged(changes_from_json(changes_json))
        client = self.client
        image: Image | None = None
        if image_id_problem(image_id) is not None:  # never sent: the plan fails it (bad_id)
            return Target(project_id, region_id, image_id, changes, None, source)
        try:
            image = await self._read(lambda: client.get_image(project_id, region_id, image_id))
        except NotFound:
            image = None
        if image is not None:
            self._count_row(source)
        return Target(project_id, region_id, image_id, changes, image, source)

"""CSV selector files, streamed: a header naming the columns, one target a line."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from worker import safety
from worker.errors import JobError
from worker.models import SETTABLE_FIELDS, Changes
from worker.spec.checks import _check_field, _check_key, _check_value, _did_you_mean, _Problem
from worker.spec.rows import _NO_CHANGES, CSV_SHOWN, Row, _id_text, _image_id, _Rows


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
            shown = safety.excerpt(name, CSV_SHOWN)
            rows.fail(f"column {shown} appears twice", 1, shown)
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
                if len(name) > CSV_SHOWN:
                    hint = None
            shown = safety.excerpt(name, CSV_SHOWN)
            rows.fail(
                f"unknown column {shown}" if name else "a column has no name",
                1,
                (name if len(name) <= CSV_SHOWN else shown) or f"column {i + 1}",
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
            try:
                if len(cells) != width:
                    field = (columns[len(cells)].name if len(cells) < width
                             else f"column {width + 1}")
                    rows.fail(f"the row has {len(cells)} cells; the header has {width}", line,
                              field)
                row = _csv_row(cells, columns, rows, line=line, pid=default_pid, rid=default_rid)
            except JobError as exc:
                rows.bad_row(exc)  # raised, unless validate lists every row in error
                continue
            yield row
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
                # keys separated by ';' or ',' (a key holding a comma: a JSON row removes it)
                keys = cell.replace(",", ";").split(";")
                removed = tuple(dict.fromkeys(_check_key(k.strip()) for k in keys if k.strip()))
            else:
                fields[column.key] = _check_field(column.key, cell)
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

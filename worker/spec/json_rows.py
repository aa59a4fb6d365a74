"""JSON (a list of row objects) and JSON Lines (one object a line) selector files, streamed."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from worker.errors import JobError
from worker.models import SETTABLE_FIELDS, Changes
from worker.spec.checks import (
    _check_field,
    _check_key,
    _check_tag_map,
    _did_you_mean,
    _dotted,
    _kind,
    _Problem,
    _short,
)
from worker.spec.rows import _NO_CHANGES, CSV_SHOWN, Row, _image_id, _Rows
from worker.spec.source import _WS, _DuplicateKey, _pairs

_ROW_KEYS = ("project_id", "region_id", "image_id", "set_tags", "remove_tags", "set")
_ROW_KEY_SET = frozenset(_ROW_KEYS)
_ROW_DECODER = json.JSONDecoder(object_pairs_hook=_pairs)
_CHUNK = 1 << 16
_MAX_ROW = 1 << 24


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
                raise _Problem(  # the file's own text: shown short, as a CSV header cell
                    "unknown key",
                    hint=_did_you_mean(key, _ROW_KEYS) or "row keys: " + ", ".join(_ROW_KEYS),
                    at=(key if len(key) <= CSV_SHOWN else key[:CSV_SHOWN] + "...",),
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
                try:
                    obj = _ROW_DECODER.decode(text)
                except json.JSONDecodeError as exc:
                    rows.fail(f"JSON syntax error: {exc.msg} (column {exc.colno})", line)
                except _DuplicateKey as exc:
                    rows.fail(f"duplicate key {exc.key!r}", line, exc.key)
                except (ValueError, RecursionError) as exc:
                    rows.fail(f"cannot read the row: {str(exc).split(';')[0]}", line)
                row = _json_row(obj, rows, line)
            except JobError as exc:
                rows.bad_row(exc)  # raised, unless validate lists every row in error
                continue
            yield row
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
            try:
                row: Row | None = _json_row(obj, rows, line)
            except JobError as exc:  # the row's shape: the list reads on
                rows.bad_row(exc)
                row = None
            if row is not None:
                yield row
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

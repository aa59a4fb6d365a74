"""Reading the job file's text: YAML (1.2 core-schema scalars) or JSON, keeping every key's and
item's line so that an error can name it.

YAML: only ``true``/``false`` are booleans (``no``, ``on``, ``yes`` stay text), ``12:30`` and
``2024-01-01`` stay text, ``010`` is ten. Duplicate keys are errors; anchors, aliases and ``<<``
merge keys work. JSON: duplicate keys and lone surrogate escapes are errors (the selector files'
JSON readers share these checks).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from typing import Any, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from worker.errors import JobError
from worker.spec.checks import Path_, _kind, _short

# YAML ------------------------------------------------------------------------------------------


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
#: The most values a job file may hold with its aliases expanded (a YAML alias bomb stops here).
MAX_VALUES = 100_000
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
        # values the tree holds once aliases are expanded, and each read node's share of it
        self.expanded = 0
        self.sizes: dict[int, int] = {}

    def fail(self, node: Node, message: str, hint: str | None = None) -> NoReturn:
        raise JobError(message, file=self.file, line=node.start_mark.line + 1, hint=hint)

    def grow(self, node: Node, n: int) -> None:
        self.expanded += n
        if self.expanded > MAX_VALUES:
            self.fail(node, f"the YAML expands to more than {MAX_VALUES:,} values (aliases"
                      " repeating aliases?)", "a job is short: write it out, or use fewer aliases")

    def walk(self, node: Node, path: Path_) -> Any:
        if isinstance(node, ScalarNode):
            self.grow(node, 1)
            try:
                return self.loader.construct_object(node)
            except (ValueError, TypeError, OverflowError) as exc:
                reason = str(exc).split(";")[0]
                self.fail(node, f"cannot read the value {_short(node.value)}: {reason}")
        key = id(node)
        if key in self.done:  # an alias of a node already read: its values count again
            self.grow(node, self.sizes[key])
            return self.done[key]
        before = self.expanded
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
        self.sizes[key] = self.expanded - before
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


# JSON ------------------------------------------------------------------------------------------
# Duplicate keys and lone surrogate escapes are errors (the selector files' readers share these).


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

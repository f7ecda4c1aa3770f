"""Safe YAML loading that remembers the line of every key, so errors can point at it.

Only ``yaml.SafeLoader`` node composition is used: no Python object tags, no code, no pickle.
Whatever bytes a file holds, :func:`load_yaml` either returns plain data (dicts with string keys,
lists, and the YAML core scalars) or raises one :class:`SpecError` naming the file and, where the
text allows, the line. Refused: files that are not regular files or exceed ``MAX_FILE_BYTES``,
invalid UTF-8, characters YAML forbids, malformed YAML, several documents, duplicate keys,
non-string keys, merge keys, tags on mappings or sequences, nesting deeper than ``MAX_DEPTH``,
and alias expansion beyond ``MAX_NODES`` nodes (the "billion laughs" document).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conformance.errors import SpecError

# An alias-heavy document can expand exponentially; a real spec has a few thousand nodes.
MAX_NODES = 200_000
MAX_FILE_BYTES = 4 * 1024 * 1024
# A spec nests five levels; Python's recursion limit is what a deeper document would hit first.
MAX_DEPTH = 64
Loc = tuple[str | int, ...]
_PLAIN_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
# Errors the scalar constructors raise on values they cannot build (a 5000-digit integer, a
# timestamp with month 13, bad base64) besides yaml.YAMLError.
_SCALAR_ERRORS = (yaml.YAMLError, ValueError, OverflowError, TypeError)


@dataclass
class YamlDocument:
    """Plain Python data of one YAML file plus the line (1-based) of every mapping key and item."""

    path: Path
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    text: str = ""

    def line_of(self, loc: Sequence[str | int]) -> int | None:
        """Line of the deepest known prefix of ``loc`` (pydantic error locations map here)."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), 1)


def _mark_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's context and problem as one phrase, e.g. 'expected a single document in the stream, but
    found another document'."""
    problem, context = _one_line(exc.problem or ""), _one_line(exc.context or "")
    if problem and context:
        if problem.startswith("but "):
            return f"{context}, {problem}"
        elsewhere = exc.context_mark is not None and exc.problem_mark is not None and \
            exc.context_mark.line != exc.problem_mark.line
        return f"{problem} ({context}" + (f" on line {exc.context_mark.line + 1})" if elsewhere else ")")
    return problem or context or "malformed YAML"


def _read_capped(path: Path) -> bytes:
    """The bytes of a regular file of at most ``MAX_FILE_BYTES`` (a FIFO or /dev/zero is refused, not read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpecError(path, None, None, "file not found") from None
    except OSError as exc:
        raise SpecError(path, None, None, f"cannot read file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(path, None, None, "not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(path, None, None, f"cannot read file ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(path, None, None, f"file is larger than {MAX_FILE_BYTES} bytes, the limit for specs")
    return raw


def load_yaml(path: str | Path) -> YamlDocument:
    """Load ``path`` safely, recording key lines. Raises :class:`SpecError` on any problem, never
    anything else: the error names the file, the line when the text has one, and the reason."""
    path = Path(path)
    raw = _read_capped(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(path, line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None

    def line_at(position: int | None) -> int | None:
        return None if position is None else text.count("\n", 0, position) + 1

    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # the reader checks every character already here
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise SpecError(path, line, None, f"malformed YAML: {_yaml_reason(exc)}") from None
    except yaml.reader.ReaderError as exc:
        raise SpecError(path, line_at(exc.position), None,
                        f"malformed YAML: character #x{exc.character:04x} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        raise SpecError(path, None, None, f"malformed YAML: {_one_line(str(exc))}") from None
    except RecursionError:
        line = loader.line + 1 if loader is not None else None
        raise SpecError(path, line, None, f"malformed YAML: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    doc = YamlDocument(path=path, data=None, text=text)
    if root is None:
        raise SpecError(path, 1, None, "file is empty")
    budget = [MAX_NODES]
    doc.lines[()] = _mark_line(root)
    doc.data = _build(root, (), doc, loader, budget)
    return doc


def _build(node: yaml.Node, loc: Loc, doc: YamlDocument, loader: yaml.SafeLoader, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(doc.path, _mark_line(node), None, f"document expands to more than {MAX_NODES} nodes "
                        "(alias expansion?)")
    if len(loc) > MAX_DEPTH:
        raise SpecError(doc.path, _mark_line(node), None, f"nested deeper than {MAX_DEPTH} levels "
                        "(or an alias refers to its own anchor)")
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_COLLECTION_TAGS:
        raise SpecError(doc.path, _mark_line(node), _dotted(loc) or None, f"tag {node.tag!r} is not allowed here")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SpecError(doc.path, _mark_line(key_node), None, "merge keys ('<<') are not supported")
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(doc.path, _mark_line(key_node), None, "mapping keys must be plain strings")
            key = key_node.value
            if key in out:
                first = doc.lines.get((*loc, key))
                raise SpecError(doc.path, _mark_line(key_node), _dotted((*loc, key)),
                                f"duplicate key (first defined on line {first})")
            doc.lines[(*loc, key)] = _mark_line(key_node)
            out[key] = _build(value_node, (*loc, key), doc, loader, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            doc.lines[(*loc, i)] = _mark_line(item)
            items.append(_build(item, (*loc, i), doc, loader, budget))
        return items
    try:
        return loader.construct_object(node, deep=True)
    except _SCALAR_ERRORS as exc:
        reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
        raise SpecError(doc.path, _mark_line(node), _dotted(loc) or None, f"bad value: {_one_line(reason)}") from None


def _dotted(loc: Sequence[str | int]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


dotted = _dotted

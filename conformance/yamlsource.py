"""Safe YAML loading that remembers the line of every key, so errors can point at it.

Only ``yaml.SafeLoader`` node composition is used (no Python object tags). Duplicate keys,
non-string keys, invalid UTF-8 and alias expansion bombs are refused with a :class:`SpecError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError

# An alias-heavy document can expand exponentially; a real spec has a few thousand nodes.
MAX_NODES = 200_000
MAX_FILE_BYTES = 4 * 1024 * 1024

Loc = tuple[str | int, ...]


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


def load_yaml(path: str | Path) -> YamlDocument:
    """Load ``path`` safely, recording key lines. Raises :class:`SpecError` on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(path, None, None, "file not found") from None
    except OSError as exc:
        raise SpecError(path, None, None, f"cannot read file ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(path, None, None, f"file is {len(raw)} bytes; specs are limited to {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(path, line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = exc.problem or exc.context or "malformed YAML"
        raise SpecError(path, line, None, f"malformed YAML: {reason}") from None
    except yaml.YAMLError as exc:
        raise SpecError(path, None, None, f"malformed YAML: {exc}") from None
    finally:
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
    except yaml.YAMLError as exc:
        raise SpecError(doc.path, _mark_line(node), _dotted(loc) or None, f"bad value: {exc}") from None


def _dotted(loc: Sequence[str | int]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


dotted = _dotted

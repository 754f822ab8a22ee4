"""Reading a policy file: YAML with the line of every value kept, and bounds against hostile input.

PyYAML's safe loader builds plain values and forgets where they were. Errors in a policy must
name the file and line, so the document is composed into nodes (still the safe loader: no
tags that build objects) and converted here, remembering each value's line by its key path.
The conversion is bounded: file size, nesting depth and the number of values produced, which
also stops alias bombs (a few anchors that expand to billions of values).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000
_PLAIN_COLLECTIONS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})

Path_ = tuple[str | int, ...]


class SourceError(ValueError):
    """A problem at a place in a file: `file:line: key.path: why`."""

    def __init__(self, file: str, line: int | None, path: Path_, why: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        key = format_path(path)
        super().__init__(f"{where}: {key + ': ' if key else ''}{why}")
        self.file, self.line, self.path, self.why = file, line, path, why


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class Document:
    """One YAML document: its value, and the line (1-based) where each key path starts."""

    file: str
    data: Any
    lines: dict[Path_, int]

    def line(self, path: Path_) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def error(self, path: Path_, why: str) -> SourceError:
        return SourceError(self.file, self.line(path), path, why)


def load(text: str | bytes, file: str) -> Document:
    """Parse one YAML document; SourceError on anything but a single, bounded, plain-data document."""
    size = len(text.encode()) if isinstance(text, str) else len(text)
    if size > MAX_BYTES:
        raise SourceError(file, None, (), f"is {size} bytes; a policy file may be at most {MAX_BYTES}")
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except RecursionError:  # PyYAML's composer recurses per level, long before MAX_DEPTH is checked
        raise SourceError(file, None, (), f"nested deeper than {MAX_DEPTH} levels") from None
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark is not None else None
        raise SourceError(file, line, (), f"not valid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise SourceError(file, None, (), f"not valid YAML: {err}") from None
    if len(nodes) != 1:
        raise SourceError(file, None, (), f"expected one YAML document, found {len(nodes)}")
    builder = _Builder(file)
    data = builder.build(nodes[0], (), 0)
    return Document(file, data, builder.lines)


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Path_, int] = {}
        self.count = 0
        self.scalars = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise SourceError(self.file, node.start_mark.line + 1, path,
                              f"more than {MAX_VALUES} values (aliases expanding without end?)")
        if depth > MAX_DEPTH:
            raise SourceError(self.file, node.start_mark.line + 1, path, f"nested deeper than {MAX_DEPTH} levels")
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_COLLECTIONS:
            raise SourceError(self.file, node.start_mark.line + 1, path,
                              f"unsupported tag {node.tag!r}; use plain values")
        if isinstance(node, yaml.MappingNode):
            return dict(self._pairs(node, path, depth))
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        try:  # int, float, bool, None or str, as YAML 1.1 says; no tag that builds objects
            return self.scalars.construct_object(node)
        except yaml.YAMLError:
            raise SourceError(self.file, node.start_mark.line + 1, path,
                              f"unsupported tag {node.tag!r}; use plain values") from None
        except (ValueError, LookupError, AttributeError, TypeError, OverflowError) as err:
            raise SourceError(self.file, node.start_mark.line + 1, path,
                              f"cannot read {node.value[:40]!r} as {node.tag.rpartition(':')[2]} ({err}); quote it "
                              "to keep it a string") from None

    def _pairs(self, node: yaml.MappingNode, path: Path_, depth: int) -> Iterator[tuple[str, Any]]:
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SourceError(self.file, key_node.start_mark.line + 1, path, "merge keys (<<) are not supported")
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceError(self.file, key_node.start_mark.line + 1, path, "keys must be plain strings")
            key = str(key_node.value)
            if key in seen:
                raise SourceError(self.file, key_node.start_mark.line + 1, (*path, key), "appears twice")
            seen.add(key)
            self.lines.setdefault((*path, key), key_node.start_mark.line + 1)  # the key's line, not its value's
            yield key, self.build(value_node, (*path, key), depth + 1)

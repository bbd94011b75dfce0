"""YAML mechanics of Kubernetes manifests (pure: text in, documents out).

What PyYAML does not do the way the API server does: a duplicate key is an
error (with both lines), aliases are refused, timestamps stay text, a lone
surrogate escape is not text; and the one way a YAML syntax error is told to
the user, with its line and column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml


class ManifestLoader(yaml.SafeLoader):
    """SafeLoader for Kubernetes manifests: timestamps stay text (PyYAML
    raises a bare ValueError on impossible dates; the HTTPRoute parser reports
    them by field, and converted manifests keep them as written), and aliases
    are refused, since they make recursive or exponentially large documents."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported in manifests", event.start_mark)
        return super().compose_node(parent, index)


ManifestLoader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def yaml_problem(source: str, error: yaml.YAMLError) -> str:
    """``source: not valid YAML at line N, column M: what`` (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{source}: not valid YAML{at}: {getattr(error, 'problem', None) or error}"


@dataclass(frozen=True, slots=True)
class DuplicateKey:
    path: str
    key: str
    line: int
    first_line: int

    @property
    def message(self) -> str:
        return f"duplicate key {self.key!r} at line {self.line} (first at line {self.first_line})"


def _duplicate_keys(node: yaml.Node, path: str = "") -> Iterator[DuplicateKey]:
    """Keys given twice in one mapping. PyYAML keeps the last silently; the
    API server (and kubectl) refuse them, and the first is often the one meant."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            where = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in first:
                yield DuplicateKey(where, key, line, first[key])
            else:
                first[key] = line
            yield from _duplicate_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{i}]")


def load_with_duplicates(text: str) -> list[tuple[object, list[DuplicateKey]]]:
    """Each document with its duplicate keys, found on the node tree (where
    lines are known) before PyYAML builds the dict that keeps only the last.
    Raises yaml.YAMLError (see yaml_problem) or RecursionError."""
    loader = ManifestLoader(text)
    try:
        documents: list[tuple[object, list[DuplicateKey]]] = []
        while loader.check_node():
            node = loader.get_node()
            duplicates = list(_duplicate_keys(node)) if node is not None else []
            documents.append((loader.construct_document(node) if node is not None else None, duplicates))
        return documents
    finally:
        loader.dispose()


def unencodable_paths(value: object, path: str = "") -> Iterator[str]:
    """Paths of strings that are not valid Unicode text (YAML "\\ud800" escapes)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            yield path or "(document)"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from unencodable_paths(k, path)
            yield from unencodable_paths(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from unencodable_paths(v, f"{path}[{i}]")

"""YAML mechanics of Kubernetes manifests (pure: text in, documents out).

What PyYAML does not do the way the API server does: a duplicate key is an
error (with both lines), aliases are refused, timestamps stay text, a lone
surrogate escape is not text; and the one way a YAML syntax error is told to
the user, with its line and column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError

# How kubectl reads a plain (unquoted) scalar: sigs.k8s.io/yaml decodes with
# go-yaml v2, whose YAML 1.1 resolution differs from PyYAML's: `y`/`n` are
# booleans, `1e3` is a number, `1:20` (sexagesimal in PyYAML) is text. A value
# must mean here what it means to the API server, or the parser would accept a
# field kubectl refuses (or the converse).
_GO_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False),
}
_GO_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_GO_SPECIAL_FLOATS = {
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
}
# strconv.ParseInt(s, 0, 64) after go-yaml removed underscores: prefixes in either case,
# a leading 0 is octal.
_GO_INT = re.compile(r"[-+]?(?:0[bB][01]+|0[oO][0-7]+|0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_GO_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_BOOL, _NULL, _INT, _FLOAT, _STR = (f"tag:yaml.org,2002:{t}" for t in ("bool", "null", "int", "float", "str"))


def go_yaml_tag(value: str) -> str:
    """The tag go-yaml v2 gives a plain scalar (timestamps excepted: they stay text)."""
    if value in _GO_BOOLS:
        return _BOOL
    if value in _GO_NULLS:
        return _NULL
    if value in _GO_SPECIAL_FLOATS:
        return _FLOAT
    if value[:1] in tuple("+-0123456789."):
        plain = value.replace("_", "")
        # A 64-bit range check as Go's: larger integers are floats there.
        if _GO_INT.fullmatch(plain) and -(2**63) <= _go_int(plain) < 2**64:
            return _INT
        if _GO_FLOAT.fullmatch(plain):
            return _FLOAT
    return _STR


def _go_int(plain: str) -> int:
    sign, digits = (-1, plain[1:]) if plain[:1] == "-" else (1, plain.lstrip("+"))
    if len(digits) > 1 and digits[0] == "0" and digits[1] in "0123456789":
        return sign * int(digits, 8)
    return sign * int(digits, 0)


class GoYamlResolution:
    """Plain scalars resolved as go-yaml resolves them: mixed into the loader
    (a value means what it means to kubectl) and into dumpers (a string that
    kubectl would read as something else, such as `y`, is written quoted)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            return go_yaml_tag(value)
        return super().resolve(kind, value, implicit)  # type: ignore[misc]


class ManifestDumper(GoYamlResolution, yaml.SafeDumper):
    """SafeDumper whose output kubectl reads back as the same values."""


class ManifestLoader(GoYamlResolution, yaml.SafeLoader):
    """SafeLoader for Kubernetes manifests: plain scalars resolve as kubectl's
    go-yaml resolves them (above; timestamps stay text: PyYAML raises a bare
    ValueError on impossible dates, the HTTPRoute parser reports them by field,
    and converted manifests keep them as written), and aliases are refused,
    since they make recursive or exponentially large documents."""

    def construct_yaml_bool(self, node: Any) -> bool:
        return _GO_BOOLS[self.construct_scalar(node)]

    def construct_yaml_int(self, node: Any) -> int:
        value: str = self.construct_scalar(node)
        return _go_int(value.replace("_", ""))

    def construct_yaml_float(self, node: Any) -> float:
        value: str = self.construct_scalar(node)
        return _GO_SPECIAL_FLOATS.get(value) or float(value.replace("_", ""))

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported in manifests", event.start_mark)
        return super().compose_node(parent, index)


ManifestLoader.add_constructor(_BOOL, ManifestLoader.construct_yaml_bool)
ManifestLoader.add_constructor(_INT, ManifestLoader.construct_yaml_int)
ManifestLoader.add_constructor(_FLOAT, ManifestLoader.construct_yaml_float)


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


def read_documents(text: str, source: str) -> list[tuple[object, list[DuplicateKey]]]:
    """load_with_duplicates, its failures as one ConfigError naming ``source``."""
    try:
        return load_with_duplicates(text)
    except RecursionError:
        raise ConfigError([f"{source}: not valid YAML: nested too deeply"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([yaml_problem(source, e)]) from None


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

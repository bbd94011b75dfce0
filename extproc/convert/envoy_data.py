"""An Envoy configuration as plain data, for ``convert envoy``: field access
in either spelling (Envoy reads snake_case and camelCase alike), one input
file, and what a conversion finds wrong with it (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from betterproto2 import Casing


def camel_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def key_of(obj: dict[str, Any], name: str) -> str | None:
    for candidate in (name, camel_name(name)):
        if candidate in obj:
            return candidate
    return None


def value_of(obj: dict[str, Any], name: str) -> Any:
    key = key_of(obj, name)
    return None if key is None else obj[key]


def mapping_or_empty(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else a new empty one."""
    return value if isinstance(value, dict) else {}


def list_or_empty(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def repeated(value: Any) -> list[Any]:
    """A repeated field's items as Envoy reads them (YAML and JSON alike): a
    lone value where a list is expected (``request_headers_to_remove: x-foo``,
    ``headers: {name: ...}``) is a list of that one item; absent, none."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


@dataclass
class Source:
    """One input file, parsed."""

    path: Path
    label: str
    data: Any
    json: bool
    camel: bool

    def field(self, obj: dict[str, Any], name: str) -> str:
        """The key to use for ``name`` in ``obj``: the one it has, else the file's spelling."""
        return key_of(obj, name) or (camel_name(name) if self.camel else name)

    @property
    def casing(self) -> Casing:
        return Casing.CAMEL if self.camel else Casing.SNAKE


def camel_style(data: Any) -> bool:
    """Whether a file spells Envoy's field names in camelCase (protobuf JSON)."""
    camel = snake = 0
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and "." not in k and not k.startswith("@"):
                    camel += bool(re.match(r"^[a-z]+[A-Z]", k))
                    snake += bool(re.match(r"^[a-z]+_[a-z]", k))
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return camel > snake


class Findings:
    """What a conversion found: problems (it cannot go on) and notes (for the user)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.notes: list[str] = []

    def mapping(self, src: Source, path: str, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{src.label}: {path}: must be a mapping, got {type(value).__name__}")
            return None
        return value

    def items(self, src: Source, path: str, value: Any, kind: type[str] | type[dict[str, Any]]) -> list[Any] | None:
        """A repeated field of ``kind`` items (header names, or messages as
        mappings), a lone item included (``repeated``); None, with a problem
        naming the field, when an item is of another kind: Envoy refuses those."""
        what = "a string" if kind is str else "a mapping"
        found = repeated(value)
        for i, item in enumerate(found):
            if not isinstance(item, kind):
                where = f"{path}[{i}]" if isinstance(value, list) else path
                either = "" if isinstance(value, list) else " or a list of them"
                self.problems.append(f"{src.label}: {where}: must be {what}{either}, got {type(item).__name__}")
                return None
        return found

    def listing(self, src: Source, path: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problems.append(f"{src.label}: {path}: must be a list, got {type(value).__name__}")
            return []
        return value

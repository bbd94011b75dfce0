"""What differs between two responses, field by field (pure).

Status, headers (without a default ignore set and the user's), and the body:
as JSON by field path when both sides are JSON (objects by key, arrays by
index, numbers within an optional tolerance), otherwise by SHA-256 digest.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .paths import Matcher, Matching, Pattern, Segment, render

# Headers that differ between any two responses without meaning anything.
DEFAULT_IGNORED_HEADERS: Final = frozenset({"date", "server", "content-length", "x-request-id", "x-envoy-upstream-service-time"})
ABSENT: Final = "(absent)"
_SHOWN = 200  # characters of a value kept for display
# The walk's bounds, so that a pair's cost stays linear in its bodies' size
# (both are within the body bound): nesting deeper than this many levels below
# ``body`` is compared whole, as one field; a body with more differing fields
# than this is one field, ``body``, by digest (and its fields' rates bounded).
MAX_DEPTH: Final = 32
MAX_FIELDS: Final = 100


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One differing field: its path and both sides, shortened for display."""

    path: str
    primary: str
    shadow: str


@dataclass(frozen=True, slots=True)
class DiffRules:
    ignored_headers: frozenset[str] = DEFAULT_IGNORED_HEADERS
    ignored: tuple[Pattern, ...] = ()
    # Numbers differing by at most this much are the same (0: exactly equal).
    tolerance: float = 0.0

    def ignores(self, path: tuple[Segment, ...]) -> bool:
        return any(p.matches(path) for p in self.ignored)


@dataclass(frozen=True, slots=True)
class Side:
    """What is compared of one response."""

    status: int
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    body_truncated: bool = False


@dataclass(frozen=True, slots=True)
class Diff:
    fields: tuple[FieldDiff, ...] = field(default_factory=tuple)

    @property
    def same(self) -> bool:
        return not self.fields

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.fields)


def _show(value: Any) -> str:
    text = value if isinstance(value, str) and value == ABSENT else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def _header_map(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return {k: ", ".join(v) for k, v in out.items()}


def diff_headers(primary: Iterable[tuple[str, str]], shadow: Iterable[tuple[str, str]], rules: DiffRules) -> list[FieldDiff]:
    p, s = _header_map(primary), _header_map(shadow)
    out = []
    for name in sorted(p.keys() | s.keys()):
        path = ("header", name)
        if name in rules.ignored_headers or rules.ignores(path) or p.get(name) == s.get(name):
            continue
        out.append(FieldDiff(render(path), p.get(name, ABSENT), s.get(name, ABSENT)))
    return out


def _parse_json(body: bytes) -> tuple[bool, Any]:
    if not body.strip():
        return False, None
    try:
        return True, json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past the parser's depth
        return False, None


def _numbers_equal(a: Any, b: Any, tolerance: float) -> bool:
    if a == b:
        return True
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return tolerance > 0 and abs(a - b) <= tolerance
    except OverflowError:  # an integer past any float against a float: they are not within a tolerance
        return False


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class TooManyFields(Exception):
    """More than MAX_FIELDS differing fields: ``diff_bodies`` compares the body by digest."""


class _Walk:
    """Both bodies' JSON walked together; each node steps its parent's
    pattern matching by its own key or index (paths.Matcher)."""

    __slots__ = ("matcher", "tolerance", "found")

    def __init__(self, rules: DiffRules) -> None:
        self.matcher = Matcher(rules.ignored)
        self.tolerance = rules.tolerance
        self.found: list[FieldDiff] = []

    def body(self, primary: Any, shadow: Any) -> list[FieldDiff]:
        self.node(primary, shadow, ("body",), self.matcher.step(self.matcher.start(), "body"))
        return self.found

    def node(self, primary: Any, shadow: Any, path: tuple[Segment, ...], matching: Matching) -> None:
        matcher = self.matcher
        if matcher.accepts(matching):
            return
        if isinstance(primary, dict) and isinstance(shadow, dict):
            if len(path) > MAX_DEPTH:
                self.whole(primary, shadow, path)
                return
            for key in sorted(primary.keys() | shadow.keys()):
                self.node(primary.get(key, _MISSING), shadow.get(key, _MISSING), (*path, key), matcher.step(matching, key))
            return
        if isinstance(primary, list) and isinstance(shadow, list):
            if len(path) > MAX_DEPTH:
                self.whole(primary, shadow, path)
                return
            for i in range(max(len(primary), len(shadow))):
                a = primary[i] if i < len(primary) else _MISSING
                b = shadow[i] if i < len(shadow) else _MISSING
                self.node(a, b, (*path, i), matcher.step(matching, i))
            return
        if _is_number(primary) and _is_number(shadow):
            same = _numbers_equal(primary, shadow, self.tolerance)
        else:
            same = type(primary) is type(shadow) and primary == shadow
        if not same:
            self.add(path, primary, shadow)

    def whole(self, primary: Any, shadow: Any, path: tuple[Segment, ...]) -> None:
        """Below MAX_DEPTH: the two subtrees as one field (exactly, keys in any order)."""
        if _canonical(primary) != _canonical(shadow):
            self.add(path, primary, shadow)

    def add(self, path: tuple[Segment, ...], primary: Any, shadow: Any) -> None:
        self.found.append(FieldDiff(render(path), _display(primary), _display(shadow)))
        if len(self.found) > MAX_FIELDS:
            raise TooManyFields


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def diff_json(primary: Any, shadow: Any, rules: DiffRules) -> list[FieldDiff]:
    """Every differing leaf (or differing type) at its path; ignored paths and
    everything below them are left out. TooManyFields past MAX_FIELDS."""
    return _Walk(rules).body(primary, shadow)


class _Missing:
    def __repr__(self) -> str:
        return ABSENT


_MISSING: Final = _Missing()


def _display(value: Any) -> str:
    return ABSENT if value is _MISSING else _show(value)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def diff_bodies(primary: bytes, shadow: bytes, rules: DiffRules, truncated: bool = False) -> list[FieldDiff]:
    """By field when both parse as JSON (and neither was cut at the bound), else
    by digest; by digest too past MAX_FIELDS differing fields."""
    if primary == shadow:
        return []
    if not truncated:
        p_ok, p_doc = _parse_json(primary)
        s_ok, s_doc = _parse_json(shadow)
        if p_ok and s_ok:
            try:
                return diff_json(p_doc, s_doc, rules)
            except (TooManyFields, RecursionError):  # RecursionError: a value shown, nested nearly as deep as the parser allows
                pass
    if rules.ignores(("body",)):
        return []
    return [
        FieldDiff("body", f"sha256:{digest(primary)[:16]} ({len(primary)} bytes)", f"sha256:{digest(shadow)[:16]} ({len(shadow)} bytes)")
    ]


def diff(primary: Side, shadow: Side, rules: DiffRules) -> Diff:
    fields: list[FieldDiff] = []
    if primary.status != shadow.status and not rules.ignores(("status",)):
        fields.append(FieldDiff("status", str(primary.status), str(shadow.status)))
    fields += diff_headers(primary.headers, shadow.headers, rules)
    fields += diff_bodies(primary.body, shadow.body, rules, primary.body_truncated or shadow.body_truncated)
    return Diff(tuple(fields))

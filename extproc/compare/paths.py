"""Field paths and the patterns that select them (pure).

A field path names one place in a response: ``status``, ``header.<name>``,
``body`` (a body compared by digest) or ``body.<JSON path>`` such as
``body.items[2].price`` or ``body["odd key"]``. An ignore pattern is written
the same way, where ``*`` stands for one key or index and ``**`` for any
number of them: ``body.items[*].id``, ``body.**.timestamp``, ``header.etag``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


class Wildcard:
    """``*`` or ``**`` in a pattern: never a key, so a key named "*" stays a key."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


ANY_ONE: Final = Wildcard("*")
ANY_MANY: Final = Wildcard("**")
Segment = str | int | Wildcard
_PLAIN_KEY = re.compile(r"[A-Za-z_$@][A-Za-z0-9_$@-]*\Z")


def render(segments: tuple[Segment, ...]) -> str:
    """``("body", "items", 2, "price")`` -> ``body.items[2].price``."""
    out = []
    for i, seg in enumerate(segments):
        if isinstance(seg, Wildcard):
            out.append(f".{seg.text}")
        elif isinstance(seg, int):
            out.append(f"[{seg}]")
        elif _PLAIN_KEY.match(seg) or (i == 0 and seg):
            out.append(seg if i == 0 else f".{seg}")
        else:
            out.append('["' + seg.replace("\\", "\\\\").replace('"', '\\"') + '"]')
    return "".join(out)


class PatternError(ValueError):
    pass


_TOKEN = re.compile(r'\.(\*\*|\*|[A-Za-z_$@][A-Za-z0-9_$@-]*)|\[(\*|\d+)\]|\["((?:[^"\\]|\\.)*)"\]')


def parse(text: str) -> tuple[Segment, ...]:
    """The segments of a path or pattern; PatternError says where it is wrong."""
    head = re.match(r"(status|header|body)", text)
    if head is None:
        raise PatternError(f"{text!r}: must start with status, header or body")
    segments: list[Segment] = [head.group(1)]
    pos = head.end()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise PatternError(f"{text!r}: cannot read from position {pos} ({text[pos : pos + 20]!r})")
        key, index, quoted = m.groups()
        if key is not None:
            segments.append(ANY_MANY if key == "**" else ANY_ONE if key == "*" else key)
        elif index is not None:
            segments.append(ANY_ONE if index == "*" else int(index))
        else:
            segments.append(re.sub(r"\\(.)", r"\1", quoted))
        pos = m.end()
    if segments[0] == "header" and (len(segments) != 2 or isinstance(segments[1], int) or segments[1] is ANY_MANY):
        raise PatternError(f"{text!r}: a header pattern is header.<name> or header.*")
    if segments[0] == "status" and len(segments) != 1:
        raise PatternError(f"{text!r}: status has no parts")
    return tuple(s.lower() if segments[0] == "header" and isinstance(s, str) else s for s in segments)


@dataclass(frozen=True, slots=True)
class Pattern:
    segments: tuple[Segment, ...]

    @classmethod
    def of(cls, text: str) -> Pattern:
        return cls(parse(text))

    def matches(self, path: tuple[Segment, ...]) -> bool:
        return _match(self.segments, path)

    def __str__(self) -> str:
        return render(self.segments)


def _match(pattern: tuple[Segment, ...], path: tuple[Segment, ...]) -> bool:
    if not pattern:
        return not path
    head = pattern[0]
    if head is ANY_MANY:
        return any(_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    if not path:
        return False
    if head is ANY_ONE or (type(head) is type(path[0]) and head == path[0]):
        return _match(pattern[1:], path[1:])
    return False


# A place in the walk of a body: the (pattern, position) pairs still matching.
Matching = frozenset[tuple[int, int]]


class Matcher:
    """Patterns matched one segment at a time, as a walk goes down a body: each
    node steps its parent's state by its own segment, so a node costs the same
    at any depth (``_match`` on the whole path at each node cost its depth,
    times the ``**`` in the pattern)."""

    __slots__ = ("patterns",)

    def __init__(self, patterns: tuple[Pattern, ...]) -> None:
        self.patterns = tuple(p.segments for p in patterns)

    def start(self) -> Matching:
        return self._closure({(i, 0) for i in range(len(self.patterns))})

    def step(self, matching: Matching, segment: str | int) -> Matching:
        if not matching:
            return matching
        patterns = self.patterns
        out = set()
        for i, pos in matching:
            pattern = patterns[i]
            if pos == len(pattern):
                continue
            head = pattern[pos]
            if head is ANY_MANY:
                out.add((i, pos))  # ** takes this segment and may take more
            elif head is ANY_ONE or (type(head) is type(segment) and head == segment):
                out.add((i, pos + 1))
        return self._closure(out)

    def accepts(self, matching: Matching) -> bool:
        return any(pos == len(self.patterns[i]) for i, pos in matching)

    def _closure(self, pairs: set[tuple[int, int]]) -> Matching:
        """With every place a ``**`` taking nothing leads to."""
        todo = list(pairs)
        while todo:
            i, pos = todo.pop()
            pattern = self.patterns[i]
            if pos < len(pattern) and pattern[pos] is ANY_MANY and (i, pos + 1) not in pairs:
                pairs.add((i, pos + 1))
                todo.append((i, pos + 1))
        return frozenset(pairs)

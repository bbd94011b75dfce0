"""Gateway API HTTPRoute matching and precedence (pure).

Requests are matched in bytes, as Envoy matches them: header values are raw,
paths are compared without decoding. The ordering implemented here is also
the order in which ``envoyconf`` emits Envoy routes, so the sampler and Envoy
agree on which rule a request belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, Iterable, Mapping, Sequence, TypeVar
from urllib.parse import unquote_to_bytes

Headers = Mapping[str, bytes]
T = TypeVar("T")


class PathType(str, Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


class ValueType(str, Enum):
    EXACT = "Exact"
    REGEX = "RegularExpression"


# Envoy Gateway's order: Exact, then RegularExpression, then PathPrefix; a regex
# after a catch-all prefix could never match.
_PATH_RANK = {PathType.EXACT: 3, PathType.REGEX: 2, PathType.PREFIX: 1}


def _compile(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode())


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: PathType = PathType.PREFIX
    value: str = "/"
    regex: re.Pattern[bytes] | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def of(type: PathType, value: str) -> PathMatch:
        return PathMatch(type, value, _compile(value) if type is PathType.REGEX else None)

    @property
    def prefix(self) -> str:
        """Prefix value without a trailing slash: segment matching makes it redundant."""
        return self.value.rstrip("/") or "/"

    def matches(self, path: bytes) -> bool:
        if self.type is PathType.EXACT:
            return path == self.value.encode()
        if self.type is PathType.REGEX:
            assert self.regex is not None
            return self.regex.fullmatch(path) is not None
        prefix = self.prefix.encode()
        # Segment boundaries, like Envoy's path_separated_prefix: /a matches /a
        # and /a/b, never /ab.
        return prefix == b"/" or path == prefix or path.startswith(prefix + b"/")


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match."""

    name: str
    value: str
    type: ValueType = ValueType.EXACT
    regex: re.Pattern[bytes] | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def of(name: str, value: str, type: ValueType = ValueType.EXACT) -> ValueMatch:
        return ValueMatch(name, value, type, _compile(value) if type is ValueType.REGEX else None)

    def matches(self, actual: bytes | None) -> bool:
        if actual is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(actual) is not None
        return actual == self.raw

    @property
    def raw(self) -> bytes:
        return self.value.encode()


@dataclass(frozen=True, slots=True)
class Match:
    """One entry of a rule's ``matches``: all of its conditions must hold."""

    path: PathMatch = PathMatch()
    headers: tuple[ValueMatch, ...] = ()  # names lower-cased
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def precedence(self) -> tuple[int, int, int, int, int]:
        """Larger sorts first (Gateway API HTTPRouteRule precedence)."""
        return (
            _PATH_RANK[self.path.type],
            len(self.path.prefix if self.path.type is PathType.PREFIX else self.path.value),
            int(self.method is not None),
            len(self.headers),
            len(self.query_params),
        )

    def matches(self, request: RequestView) -> bool:
        if self.method is not None and request.method != self.method.encode():
            return False
        if not self.path.matches(request.path):
            return False
        for h in self.headers:
            if not h.matches(request.headers.get(h.name)):
                return False
        if self.query_params:
            params = request.query_params
            for q in self.query_params:
                if not q.matches(params.get(q.name.encode())):
                    return False
        return True


class RequestView:
    """The parts of a request matching needs, derived once per request."""

    __slots__ = ("headers", "path", "method", "host", "_query")

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        raw_path = headers.get(":path", b"/")
        self.path = raw_path.partition(b"?")[0]
        self.method = headers.get(":method", b"GET")
        self.host = normalize_host(headers.get(":authority") or headers.get("host") or b"")
        self._query: dict[bytes, bytes] | None = None

    @property
    def query_params(self) -> dict[bytes, bytes]:
        if self._query is None:
            query = self.headers.get(":path", b"").partition(b"?")[2].partition(b"#")[0]
            params: dict[bytes, bytes] = {}
            for pair in query.split(b"&") if query else ():
                k, _, v = pair.partition(b"=")
                # Envoy decodes query parameters before matching them; the first
                # occurrence of a name counts.
                params.setdefault(unquote_to_bytes(k), unquote_to_bytes(v))
            self._query = params
        return self._query


def normalize_host(authority: bytes) -> str:
    """Lower-cased host without port (Envoy is configured to ignore ports too)."""
    host = authority.decode("latin-1").strip().lower()
    if host.startswith("["):  # IPv6 literal
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def hostname_specificity(pattern: str) -> tuple[int, int]:
    """Exact over wildcard, longer wildcard over shorter; "" (any host) last."""
    if not pattern:
        return (0, 0)
    if pattern.startswith("*."):
        return (1, len(pattern))
    return (2, len(pattern))


def host_matches(pattern: str, host: str) -> bool:
    if not pattern:
        return True
    if pattern.startswith("*."):
        # One or more leading labels: *.example.com matches a.b.example.com,
        # never example.com itself.
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """A (rule, match) pair with everything precedence needs to order it."""

    match: Match
    rule: T
    route_age: str  # creationTimestamp (RFC 3339 sorts as text); "" if unknown
    route_id: str  # namespace/name
    rule_index: int
    match_index: int

    def sort_key(self) -> tuple[object, ...]:
        p = self.match.precedence()
        return (tuple(-x for x in p), self.route_age == "", self.route_age, self.route_id, self.rule_index, self.match_index)


class RouteTable(Generic[T]):
    """Virtual hosts in specificity order, each with entries in precedence order.

    Like Envoy (and Envoy Gateway), the most specific matching hostname picks
    the virtual host and there is no fallback to a less specific one.
    """

    def __init__(self, entries_by_hostname: Mapping[str, Iterable[Entry[T]]]) -> None:
        self.vhosts: list[tuple[str, list[Entry[T]]]] = sorted(
            ((h, sorted(es, key=Entry.sort_key)) for h, es in entries_by_hostname.items()),
            key=lambda item: tuple(-x for x in hostname_specificity(item[0])),
        )
        self._exact = {h: es for h, es in self.vhosts if h and not h.startswith("*.")}

    def entries_for_host(self, host: str) -> Sequence[Entry[T]]:
        exact = self._exact.get(host)
        if exact is not None:
            return exact
        for pattern, entries in self.vhosts:
            if host_matches(pattern, host):
                return entries
        return ()

    def lookup(self, request: RequestView) -> Entry[T] | None:
        for entry in self.entries_for_host(request.host):
            if entry.match.matches(request):
                return entry
        return None

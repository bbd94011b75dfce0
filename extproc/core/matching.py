"""Gateway API HTTPRoute matching and precedence (pure).

Requests are matched in bytes, as Envoy matches them: header values are raw,
paths are compared without decoding. The ordering implemented here is also
the order in which ``envoyconf`` emits Envoy routes, so the sampler and Envoy
agree on which rule a request belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

import re2

from .headers import Headers, Repeated
from .keys import query_value

T = TypeVar("T")
Regex = Any  # re2._Regexp: google-re2 ships no type stubs


class PathType(StrEnum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


class ValueType(StrEnum):
    EXACT = "Exact"
    REGEX = "RegularExpression"


# Envoy Gateway's order: Exact, then RegularExpression, then PathPrefix; a regex
# after a catch-all prefix could never match.
_PATH_RANK = {PathType.EXACT: 3, PathType.REGEX: 2, PathType.PREFIX: 1}


# Envoy refuses a regex whose RE2 program is larger than this (its
# re2.max_program_size.error_level default).
RE2_MAX_PROGRAM_SIZE = 100


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # errors are reported as ConfigError, not to stderr
    # Envoy 1.40 runs RE2 in Latin-1 mode (re2_use_latin1_mode): "." is one
    # byte and the pattern's UTF-8 bytes are read as Latin-1. Same here, so
    # non-ASCII header values match as they do in Envoy.
    options.encoding = re2.Options.Encoding.LATIN1
    return options


def compile_regex(pattern: str) -> Regex:
    """RE2, the dialect Envoy matches with: same meaning, linear time.

    Raises re2.error for what Envoy would refuse, program size included.
    """
    compiled = re2.compile(pattern.encode(), _re2_options())
    if compiled.programsize > RE2_MAX_PROGRAM_SIZE:
        raise re2.error(f"RE2 program size {compiled.programsize} is over Envoy's limit of {RE2_MAX_PROGRAM_SIZE}")
    return compiled


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: PathType = PathType.PREFIX
    value: str = "/"
    # Derived once, not per request: the compiled regex, the bytes compared.
    regex: Regex | None = field(init=False, default=None, compare=False, repr=False)
    _bytes: bytes = field(init=False, default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.type is PathType.REGEX:
            object.__setattr__(self, "regex", compile_regex(self.value))
        object.__setattr__(self, "_bytes", (self.prefix if self.type is PathType.PREFIX else self.value).encode())

    @property
    def prefix(self) -> str:
        """Prefix value without a trailing slash: segment matching makes it redundant."""
        return self.value.rstrip("/") or "/"

    def matches(self, path: bytes) -> bool:
        if self.type is PathType.EXACT:
            return path == self._bytes
        if self.type is PathType.REGEX:
            assert self.regex is not None
            return self.regex.fullmatch(path) is not None
        prefix = self._bytes
        # Segment boundaries, like Envoy's path_separated_prefix: /a matches /a
        # and /a/b, never /ab.
        if prefix == b"/":
            return path.startswith(b"/")  # not "*" (OPTIONS *)
        return path == prefix or path.startswith(prefix + b"/")


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match."""

    name: str
    value: str
    type: ValueType = ValueType.EXACT
    regex: Regex | None = field(init=False, default=None, compare=False, repr=False)
    _bytes: bytes = field(init=False, default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.type is ValueType.REGEX:
            object.__setattr__(self, "regex", compile_regex(self.value))
        object.__setattr__(self, "_bytes", self.value.encode())

    def matches(self, actual: bytes | None) -> bool:
        if actual is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(actual) is not None
        return actual == self._bytes

    def matches_any(self, values: Iterable[bytes]) -> bool:
        return any(self.matches(v) for v in values)


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
            # Envoy matches a repeated header if any of its values matches.
            if not h.matches_any(request.header_values(h.name)):
                return False
        return all(q.matches(query_value(request.raw_path, q.name.encode())) for q in self.query_params)


class RequestView:
    """The parts of a request matching needs, derived once per request.

    ``headers`` holds each header's first value; ``repeated`` every value of
    the headers that came more than once (rare, so usually empty).
    """

    __slots__ = ("headers", "repeated", "raw_path", "path", "method", "host")

    def __init__(self, headers: Headers, repeated: Repeated | None = None) -> None:
        self.headers = headers
        self.repeated = repeated or {}
        self.raw_path = headers.get(":path", b"/")
        self.path = self.raw_path.partition(b"?")[0]
        self.method = headers.get(":method", b"GET")
        self.host = normalize_host(headers.get(":authority") or headers.get("host") or b"")

    def header_values(self, name: str) -> Sequence[bytes]:
        if name == "host":
            # HTTP/2 and ext_proc carry Host as :authority; Envoy matches it there.
            name = ":authority"
        values = self.repeated.get(name)
        if values is not None:
            return values
        first = self.headers.get(name)
        return () if first is None else (first,)


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
        """The first entry whose match holds, in precedence order."""
        for entry in self.entries_for_host(request.host):
            if entry.match.matches(request):
                return entry
        return None

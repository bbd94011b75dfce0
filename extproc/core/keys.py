"""Key sources: where the bytes that get hashed come from (pure).

A request is a mapping of lower-cased header names (pseudo-headers included,
as Envoy sends them over ext_proc) to the raw bytes of the first value; the
service joins repeated ``cookie`` headers before it gets here. Keys are raw
bytes exactly as they travel: never decoded, never normalised, so the inline
(in-Envoy) rendering and any other implementation see the same bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .headers import Headers

# RFC 9110 token: what a header name may contain.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# W3C trace-context: version-traceid-parentid-flags. Version 00 is exactly
# these four fields; a later version may append "-"-separated fields; ff is invalid.
_TRACEPARENT = re.compile(rb"^(?!ff)([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?$", re.DOTALL)
_ZERO_TRACE_ID = b"0" * 32
_ZERO_PARENT_ID = b"0" * 16
# What every engine can carry: the C module (extproc/module/config.c) refuses a
# key source name longer than this (in UTF-8 bytes) and a chain longer than that.
MAX_NAME_BYTES = 256
MAX_CHAIN = 16


class KeyKind(StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"
    TRACEPARENT = "traceparent"


@dataclass(frozen=True, slots=True)
class KeySource:
    kind: KeyKind
    name: str = ""

    def __str__(self) -> str:
        return self.kind.value if self.kind is KeyKind.TRACEPARENT else f"{self.kind.value}:{self.name}"


DEFAULT_KEY_CHAIN: tuple[KeySource, ...] = (KeySource(KeyKind.HEADER, "x-request-id"),)


def is_header_name(name: str) -> bool:
    return bool(_TOKEN.match(name))


def parse_key_source(text: str) -> KeySource:
    """``header:NAME``, ``cookie:NAME``, ``query:NAME`` or ``traceparent``."""
    text = text.strip()
    if text == KeyKind.TRACEPARENT.value:
        return KeySource(KeyKind.TRACEPARENT)
    kind, sep, name = text.partition(":")
    allowed = "header:NAME, cookie:NAME, query:NAME or traceparent"
    try:
        key_kind = KeyKind(kind)
    except ValueError:
        raise ValueError(f"unknown key source {text!r}; allowed: {allowed}") from None
    if not sep or not name or key_kind is KeyKind.TRACEPARENT:
        raise ValueError(f"key source {text!r} needs a name; allowed: {allowed}")
    if key_kind is KeyKind.HEADER:
        if not is_header_name(name):
            raise ValueError(f"key source {text!r}: {name!r} is not a valid header name")
        # Envoy lower-cases header names; matching is case-insensitive.
        name = name.lower()
    else:
        # A cookie or query parameter name as it is written (user[id], sé: names
        # every engine compares as strings), never a separator of the header or query.
        if any(c in name for c in ";=&# \t"):
            raise ValueError(f"key source {text!r}: name {name!r} contains a separator character")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError(f"key source {text!r}: name {name!r} contains a control character")
        try:
            name.encode()
        except UnicodeEncodeError:
            # Bytes that are not UTF-8 (a flag or variable decoded with surrogateescape).
            raise ValueError(f"key source {text!r}: name {name!r} holds bytes that are not UTF-8") from None
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"key source {text!r}: the name is longer than {MAX_NAME_BYTES} bytes")
    return KeySource(key_kind, name)


def parse_key_chain(text: str) -> tuple[KeySource, ...]:
    """Comma-separated sources, tried in order."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    if not parts:
        raise ValueError("empty key chain; give at least one source, e.g. header:x-request-id")
    chain = tuple(parse_key_source(p) for p in parts)
    if len(chain) > MAX_CHAIN:
        raise ValueError(f"key chain {text!r} has {len(chain)} sources; at most {MAX_CHAIN}")
    if len(set(chain)) != len(chain):
        raise ValueError(f"key chain {text!r} names the same source twice")
    return chain


def cookie_value(cookie_header: bytes, name: bytes) -> bytes | None:
    for pair in cookie_header.split(b";"):
        k, sep, v = pair.strip().partition(b"=")
        if sep and k == name:
            return v.strip()
    return None


def query_value(path: bytes, name: bytes) -> bytes | None:
    """First value of a query parameter, raw (not percent-decoded), as Envoy
    compares query parameters."""
    _, sep, query = path.partition(b"?")
    if not sep:
        return None
    for pair in query.partition(b"#")[0].split(b"&"):
        k, _, v = pair.partition(b"=")
        if k == name:
            return v
    return None


def traceparent_id(value: bytes) -> bytes | None:
    m = _TRACEPARENT.match(value.strip())
    if m is None or m.group(2) == _ZERO_TRACE_ID or m.group(3) == _ZERO_PARENT_ID:
        return None
    if m.group(1) == b"00" and m.group(4) is not None:
        return None
    return m.group(2)


def source_value(source: KeySource, headers: Headers) -> bytes | None:
    """The raw key bytes this source yields for a request, or None if absent."""
    kind = source.kind
    if kind is KeyKind.HEADER:
        if source.name == "host":
            # ext_proc sends Host as :authority (so does Envoy's Lua for "host").
            return headers.get(":authority") or headers.get("host")
        return headers.get(source.name)
    if kind is KeyKind.COOKIE:
        raw = headers.get("cookie")
        return None if raw is None else cookie_value(raw, source.name.encode())
    if kind is KeyKind.QUERY:
        raw = headers.get(":path")
        return None if raw is None else query_value(raw, source.name.encode())
    raw = headers.get("traceparent")
    return None if raw is None else traceparent_id(raw)


def extract_key(chain: tuple[KeySource, ...], headers: Headers) -> tuple[KeySource, bytes] | None:
    """First source in the chain with a non-empty value.

    An empty value counts as absent and the chain moves on: hashing b"" would
    put every key-less request in the same bucket, all in or all out.
    """
    for source in chain:
        value = source_value(source, headers)
        if value:
            return source, value
    return None

"""What one side of a mirrored request looked like (pure: the clock is an
argument): the Capture, and the assembler that makes one from the request's
headers, then the response's headers and body, scrubbing the request's
secrets out of what is kept.

The observer feeds it from Envoy's gRPC access log entries (entries.py): the
capture filter puts each side's tag (``CaptureTag``) in the request's dynamic
metadata, set by the route that enabled the capture: the primary side names
its rule and the targets the request was mirrored to; the shadow side its rule
and target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

# Capture by Envoy's gRPC access log: the capture filter (Lua, extproc/compare/envoy.py)
# writes these fields, all strings but ``truncated`` (a bool), into the request's
# dynamic metadata under CAPTURE_NAMESPACE; the access log entry carries them.
CAPTURE_NAMESPACE: Final = "mirror-sampler.compare"
TAG_FIELD: Final = "tag"  # a CaptureTag as JSON
HEADERS_FIELD: Final = "headers"  # base64 of the response headers, "name: value" lines joined by "\n" (":status" among them)
BODY_FIELD: Final = "body"  # base64 of the response body's first bytes (at most the bound)
TRUNCATED_FIELD: Final = "truncated"  # the body went past the bound
# Response headers never stored, whatever the user lists.
NEVER_STORED: Final = frozenset({"set-cookie", "authorization", "cookie", "proxy-authorization"})
# Request headers whose values are credentials: wherever a response repeats
# one (an echo, an error page), it is replaced before anything is stored.
CREDENTIALS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})
REDACTED: Final = b"(redacted)"
# Shorter cookie values are left alone: replacing "1" everywhere would wreck the body.
MIN_SECRET_LENGTH: Final = 6
# The router adds it to every response that came from an upstream; a response
# Envoy made itself (no healthy host, connect failure, timeout) lacks it.
UPSTREAM_TIME_HEADER: Final = "x-envoy-upstream-service-time"
# A status is three digits (100 to 999); Envoy's upstream time whole ms, of
# which nine digits are eleven days: a longer value is not Envoy's, and would
# overflow SQLite's integers or read as an infinite latency.
STATUS_DIGITS: Final = 3
UPSTREAM_TIME_DIGITS: Final = 9
# A capture's fixed cost in memory (the object, its tuples and strings' headers), in bytes.
CAPTURE_OVERHEAD: Final = 512


class Side(StrEnum):
    PRIMARY = "primary"
    SHADOW = "shadow"


class TagError(ValueError):
    """The capture tag is missing or malformed (a configuration not made by us)."""


@dataclass(frozen=True, slots=True)
class CaptureTag:
    """Who a capture observes: set per route in Envoy's configuration."""

    side: Side
    rule: str
    # Primary: the targets this request was mirrored to (and compared). Shadow: its one target.
    targets: tuple[str, ...]

    def encode(self) -> str:
        return json.dumps({"side": self.side.value, "rule": self.rule, "targets": list(self.targets)}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | None) -> CaptureTag:
        if not text:
            raise TagError("no capture tag")
        try:
            data = json.loads(text)
            side = Side(data["side"])
            rule = data["rule"]
            listed = data["targets"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: "[[[[..." nested past the parser's depth
            raise TagError(f"capture tag: cannot read {text[:200]!r}: {e!r}") from None
        targets = tuple(listed) if isinstance(listed, list) else ()
        if not isinstance(rule, str) or not rule or not isinstance(listed, list) or not all(isinstance(t, str) and t for t in targets):
            raise TagError(f"capture tag: rule and targets must be non-empty strings: {text[:200]!r}")
        if side is Side.SHADOW and len(targets) != 1:
            raise TagError(f"capture tag: a shadow names exactly one target: {text[:200]!r}")
        return cls(side, rule, targets)


@dataclass(frozen=True, slots=True)
class Capture:
    """One side's response to one request."""

    request_id: str
    rule: str
    side: Side
    # Shadow: (its target,); primary: the targets the request was mirrored to.
    targets: tuple[str, ...]
    method: str
    path: str
    status: int
    # Response headers, lower-case names, without NEVER_STORED or the user's private ones.
    headers: tuple[tuple[str, str], ...]
    body: bytes  # at most the body bound
    # The body went past the bound: ``body`` is its beginning (and its end was not awaited).
    body_truncated: bool
    # Envoy's x-envoy-upstream-service-time (the router's own measure, whole
    # ms); for a local reply, the time between the request and the response
    # headers as the assembler was told (from the access log: Envoy's timing).
    latency_ms: float
    # Envoy answered itself: no response came from the upstream.
    local_reply: bool
    captured_at: float  # wall clock, seconds

    @property
    def target(self) -> str:
        """The shadow's target ("" for the primary)."""
        return self.targets[0] if self.side is Side.SHADOW else ""

    @property
    def weight(self) -> int:
        """About the bytes this capture holds (what a queue of them is bounded by)."""
        texts = len(self.request_id) + len(self.rule) + len(self.method) + len(self.path) + sum(map(len, self.targets))
        return CAPTURE_OVERHEAD + len(self.body) + texts + sum(len(k) + len(v) for k, v in self.headers)


@dataclass(slots=True)
class CaptureAssembler:
    """Feeds on one side's request headers, response headers and body, in that
    order; ``complete`` once the response ended."""

    tag: CaptureTag
    body_limit: int
    private_headers: frozenset[str] = frozenset()
    request_id: str = ""
    method: str = ""
    path: str = ""
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    local_reply: bool = True
    body: bytearray = field(default_factory=bytearray)
    started: float | None = None
    answered: float | None = None
    upstream_ms: float | None = None
    secrets: list[bytes] = field(default_factory=list)
    complete: Capture | None = None

    def request_headers(self, headers: list[tuple[str, str]], now: float) -> None:
        self.started = now
        for name, value in headers:
            if name == "x-request-id":
                self.request_id = value
            elif name == ":method":
                self.method = value
            elif name == ":path":
                self.path = value
            if name in CREDENTIALS or name in self.private_headers:
                self._remember_secret(name, value)

    def _remember_secret(self, name: str, value: str) -> None:
        # Envoy's access log joins a repeated request header's values with ","
        # (and HTTP/2's cookie headers with "; "): each value is a secret too.
        found = [value]
        for part in value.split(","):
            part = part.strip()
            found.append(part)
            if name == "cookie":
                found += [crumb.partition("=")[2].strip() for crumb in part.split(";")]
            elif " " in part:  # "Bearer TOKEN": the token alone too
                found.append(part.partition(" ")[2].strip())
        self.secrets += [s.encode() for s in found if len(s) >= MIN_SECRET_LENGTH]

    def _scrub(self, data: bytes, *, cut: bool = False) -> bytes:
        """``data`` without the request's secrets; ``cut``: ``data`` ends at the
        body bound, so a secret's beginning at its end goes as well."""
        secrets = sorted(set(self.secrets), key=len, reverse=True)
        for secret in secrets:
            data = data.replace(secret, REDACTED)
        if cut:
            for secret in secrets:
                data = _without_beginning_at_end(data, secret)
        return data

    def _scrub_text(self, value: str) -> str:
        return self._scrub(value.encode()).decode("utf-8", "replace") if self.secrets else value

    def response_headers(self, headers: list[tuple[str, str]], end_of_stream: bool, now: float, wall: float) -> Capture | None:
        hidden = NEVER_STORED | self.private_headers
        kept = []
        for name, value in headers:
            name = name.lower()
            if name == ":status":
                self.status = int(value) if _digits(value, STATUS_DIGITS) and value[0] != "0" else 0
            elif name == UPSTREAM_TIME_HEADER:
                self.local_reply = False
                self.upstream_ms = float(value) if _digits(value, UPSTREAM_TIME_DIGITS) else None
            elif not name.startswith(":") and name not in hidden:
                kept.append((name, self._scrub_text(value)))
        self.headers = kept
        self.answered = now
        if end_of_stream:
            return self._finish(wall)
        return None

    def response_body(self, chunk: bytes, end_of_stream: bool, wall: float) -> Capture | None:
        """Complete at the end of the body, or as soon as it passes the bound
        (what follows is not awaited)."""
        room = self.body_limit - len(self.body)
        self.body += chunk[: max(room, 0)]
        if len(chunk) > room:
            return self._finish(wall, truncated=True)
        if end_of_stream:
            return self._finish(wall)
        return None

    def _finish(self, wall: float, truncated: bool = False) -> Capture | None:
        if self.started is None or self.answered is None or not self.request_id or not self.status:
            return None  # no request id or status: nothing to join or judge it by
        self.complete = Capture(
            request_id=self.request_id,
            rule=self.tag.rule,
            side=self.tag.side,
            targets=self.tag.targets,
            method=self.method,
            path=self._scrub_text(self.path),
            status=self.status,
            headers=tuple(self.headers),
            body=self._scrub(bytes(self.body), cut=truncated),
            body_truncated=truncated,
            latency_ms=self.upstream_ms if self.upstream_ms is not None else (self.answered - self.started) * 1000.0,
            local_reply=self.local_reply,
            captured_at=wall,
        )
        return self.complete


def _digits(value: str, at_most: int) -> bool:
    """``value`` is 1 to ``at_most`` ASCII digits (str.isdigit is also true of "²", which int() refuses)."""
    return 0 < len(value) <= at_most and value.isascii() and value.isdigit()


def _without_beginning_at_end(data: bytes, secret: bytes) -> bytes:
    """``data`` with its longest ending that begins ``secret`` redacted (the
    bound cut the secret there). The first byte's places in the tail are the
    only starts worth trying; a memoryview compares without copying."""
    tail = memoryview(data)[max(len(data) - len(secret) + 1, 0) :]
    first = secret[0]
    for start, byte in enumerate(tail):
        if byte == first and secret.startswith(tail[start:]):
            return data[: len(data) - len(tail) + start] + REDACTED
    return data

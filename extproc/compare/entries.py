"""One gRPC access log entry as a Capture (pure: the clock is an argument).

Envoy's capture filter (Lua) copies each captured side's response into the
request's dynamic metadata under ``CAPTURE_NAMESPACE`` (records.py names the
fields); Envoy's gRPC access logger sends an ``HTTPAccessLogEntry`` per such
request, with that metadata, the request id, method and path, the logged
credential and private request headers, the status and the timings.

``read_entry`` takes what the observer needs out of the protobuf entry
(``LoggedEntry``, plain values); ``entry_capture`` makes it a Capture through
the one ``CaptureAssembler``, so scrubbing the request's secrets, hidden
headers, ``local_reply`` and the body bound stay where the capture is defined.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from google.protobuf.struct_pb2 import Struct

from extproc.wire.accesslog_pb2 import HTTPAccessLogEntry, RequestMethod

from .records import (
    BODY_FIELD,
    CAPTURE_NAMESPACE,
    HEADERS_FIELD,
    TAG_FIELD,
    TRUNCATED_FIELD,
    Capture,
    CaptureAssembler,
    CaptureTag,
    TagError,
)

# Why an entry is not a capture (the observer's drop reasons): no namespace,
# no tag or a tag not ours; a field that is not what the capture filter writes
# (not base64, not a string); no request id or status to join or judge it by.
BAD_TAG: Final = "bad_tag"
MALFORMED_ENTRY: Final = "malformed_entry"

# Envoy's routes send a handful of distinct tags: each is parsed once. (A bad
# one raises each time, so it is never cached.)
_tag = lru_cache(maxsize=256)(CaptureTag.decode)


class EntryError(ValueError):
    """An entry that is not a capture; ``reason`` is its drop reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LoggedEntry:
    """What the observer reads of one access log entry."""

    request_id: str
    method: str  # "GET"; "" when Envoy did not know it
    path: str
    # The logged request headers (credentials, the user's private ones): secrets to scrub, never stored.
    request_headers: tuple[tuple[str, str], ...]
    # The capture filter's fields (CAPTURE_NAMESPACE), None when the entry has no such namespace.
    fields: Mapping[str, str | bool | float | None] | None
    response_code: int | None  # Envoy's own, when set
    # Envoy's timing of the request, in ms: to the last byte sent downstream, else the stream's duration.
    elapsed_ms: float | None


def _value(struct: Struct, name: str) -> str | bool | float | None:
    if name not in struct.fields:
        return None
    value = struct.fields[name]
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        return value.number_value
    return None  # null, a list or a struct: not what the filter writes


# Each method's name; a number not here (METHOD_UNSPECIFIED, or a method added
# to Envoy after this contract) reads as "". A dict: RequestMethod.Name, read
# for every entry, took 2 µs of its 11.
_METHODS: Final = {number: name for name, number in RequestMethod.items() if number != RequestMethod.METHOD_UNSPECIFIED}


def _method(number: int) -> str:
    return _METHODS.get(number, "")


def read_entry(entry: HTTPAccessLogEntry) -> LoggedEntry:
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    fields = None
    if CAPTURE_NAMESPACE in metadata:
        struct = metadata[CAPTURE_NAMESPACE]
        fields = {name: _value(struct, name) for name in (TAG_FIELD, HEADERS_FIELD, BODY_FIELD, TRUNCATED_FIELD)}
    if common.HasField("time_to_last_downstream_tx_byte"):
        elapsed: float | None = common.time_to_last_downstream_tx_byte.ToNanoseconds() / 1e6
    elif common.HasField("duration"):
        elapsed = common.duration.ToNanoseconds() / 1e6
    else:
        elapsed = None
    request = entry.request
    response = entry.response
    return LoggedEntry(
        request_id=request.request_id,
        method=_method(request.request_method),
        path=request.path,
        request_headers=tuple(request.request_headers.items()),
        fields=fields,
        response_code=response.response_code.value if response.HasField("response_code") else None,
        elapsed_ms=elapsed,
    )


def header_lines(text: str) -> list[tuple[str, str]]:
    """The capture filter's ``name: value`` lines (joined by "\\n"); a value may
    hold ": ", so each line is split on the first only. Names lowercased."""
    out = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line:
            continue
        name, sep, value = line.partition(": ")
        if not sep and line.endswith(":"):
            name = line[:-1]  # "name:", an empty value
        if not name or (not sep and not line.endswith(":")):
            raise EntryError(MALFORMED_ENTRY, f"not a header line: {line[:100]!r}")
        out.append((name.lower(), value))
    return out


def _base64(fields: Mapping[str, str | bool | float | None], name: str) -> bytes:
    value = fields.get(name)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise EntryError(MALFORMED_ENTRY, f"{name}: not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise EntryError(MALFORMED_ENTRY, f"{name}: not base64: {e}") from None


def entry_capture(entry: LoggedEntry, body_limit: int, private_headers: frozenset[str], wall: float) -> Capture:
    """The entry's side as a Capture; EntryError when it is none (its reason counted)."""
    fields = entry.fields
    if fields is None:
        raise EntryError(BAD_TAG, f"no {CAPTURE_NAMESPACE} metadata in the entry")
    tag_text = fields.get(TAG_FIELD)
    if not isinstance(tag_text, str):
        raise EntryError(BAD_TAG, f"no {TAG_FIELD} string in the {CAPTURE_NAMESPACE} metadata")
    try:
        tag = _tag(tag_text)
    except TagError as e:
        raise EntryError(BAD_TAG, str(e)) from None
    headers = header_lines(_base64(fields, HEADERS_FIELD).decode("utf-8", "replace"))
    body = _base64(fields, BODY_FIELD)
    truncated = fields.get(TRUNCATED_FIELD) is True
    if not any(name == ":status" for name, _ in headers) and entry.response_code:
        headers.append((":status", str(entry.response_code)))
    assembler = CaptureAssembler(tag, body_limit, private_headers)
    # The logged headers first: the entry's own id, method and path win over any logged copy.
    logged = [(name.lower(), value) for name, value in entry.request_headers]
    ours = [("x-request-id", entry.request_id), (":method", entry.method), (":path", entry.path)]
    assembler.request_headers([*logged, *ours], 0.0)
    # A local reply's latency is (answered - started): Envoy's timing, not the observer's clock.
    elapsed_s = (entry.elapsed_ms or 0.0) / 1000.0
    assembler.response_headers(headers, False, elapsed_s, wall)
    capture = assembler.response_body(body, True, wall)
    if capture is None:
        raise EntryError(MALFORMED_ENTRY, "no request id or no status: nothing to join or judge it by")
    if truncated and not capture.body_truncated:
        # The capture filter stopped at its own bound: the bytes fit ours, the body did not.
        capture = dataclasses.replace(capture, body_truncated=True)
    return capture

"""gRPC over HTTP/2 for the sampler's methods (pure): which method a request's
header list asks for, the status frames answers end with, and the two
health messages (grpc.health.v1), decoded and encoded by hand."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

from extproc.wire import PROCESS_METHOD, RULE_METADATA

from .frames import END_STREAM, headers_frame

# gRPC status codes used here.
GRPC_OK: Final = 0
GRPC_NOT_FOUND: Final = 5
GRPC_RESOURCE_EXHAUSTED: Final = 8
GRPC_UNIMPLEMENTED: Final = 12
GRPC_INTERNAL: Final = 13
GRPC_UNAVAILABLE: Final = 14

PROCESS_PATH: Final = PROCESS_METHOD.encode()
CHECK_PATH: Final = b"/grpc.health.v1.Health/Check"
WATCH_PATH: Final = b"/grpc.health.v1.Health/Watch"
RULE_KEY: Final = RULE_METADATA.encode()

# The methods served: the streaming method (ext_proc's Process for the
# sampler, the transport's ``method`` otherwise) and health Check and Watch.
PROCESS, CHECK, WATCH = range(3)

# RFC 9110 token characters, lowercase only: RFC 9113 section 8.2.1 makes an
# uppercase field name malformed.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_GRPC_TIMEOUT = re.compile(rb"[0-9]{1,8}[HMSmun]")
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))


def _pct(message: str) -> bytes:
    # grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in message.encode())


_OK_HEADERS: Final = [(b":status", b"200"), (b"content-type", b"application/grpc")]
RESPONSE_HEADERS: Final = headers_frame(_OK_HEADERS, 0)
TRAILERS_OK: Final = headers_frame([(b"grpc-status", b"0")], END_STREAM)


@lru_cache(maxsize=64)
def status_frame(status: int, message: str, headers_sent: bool) -> bytes:
    """Trailers (after response HEADERS) or a trailers-only response, stream id 0."""
    fields = [] if headers_sent else list(_OK_HEADERS)
    fields.append((b"grpc-status", str(status).encode()))
    if message:
        fields.append((b"grpc-message", _pct(message)))
    if status == GRPC_UNIMPLEMENTED and message.startswith("compressed"):
        fields.append((b"grpc-accept-encoding", b"identity"))
    return headers_frame(fields, END_STREAM)


@lru_cache(maxsize=8)
def http_status_frame(status: int) -> bytes:
    return headers_frame([(b":status", str(status).encode())], END_STREAM)


# What a request's header list asks for: (method kind, a complete answer for a
# request that is not served (or None), the value of the metadata key the
# servicer reads (the rule id for the sampler), a non-identity encoding);
# None for a malformed request (RFC 9113 section 8.2: RST_STREAM PROTOCOL_ERROR).
Request = tuple[int, bytes | None, str | None, bool]


def check_request(
    headers: list[tuple[bytes, bytes]], max_header_list_size: int, key: bytes = RULE_KEY, method_path: bytes = PROCESS_PATH
) -> Request | None:
    """The request header validation of RFC 9113 and gRPC over HTTP/2; ``key``
    names the metadata whose value goes to ``open_stream``, ``method_path`` the
    streaming method served (``PROCESS``; any other path but health's is UNIMPLEMENTED)."""
    method = scheme = path = ctype = rule = timeout = None
    encoding = False
    authority = regular = False
    size = 0
    for k, v in headers:
        size += len(k) + len(v) + 32
        if k[:1] == b":":
            if regular:
                return None  # pseudo-header after a regular field
            if k == b":path" and path is None:
                path = v
            elif k == b":method" and method is None:
                method = v
            elif k == b":scheme" and scheme is None:
                scheme = v
            elif k == b":authority" and not authority:
                authority = True
            else:
                return None  # unknown, duplicate or response pseudo-header
            continue
        regular = True
        if not _FIELD_NAME.fullmatch(k) or _BAD_VALUE.search(v) or k in _CONNECTION_SPECIFIC or (k == b"te" and v != b"trailers"):
            return None  # RFC 9113 section 8.2
        if k == key:
            rule = v
        elif k == b"content-type":
            ctype = v
        elif k == b"grpc-timeout":
            timeout = v
        elif k == b"grpc-encoding":
            encoding = v != b"identity"
    if method is None or (method != b"CONNECT" and (not scheme or not path)):
        return None  # a required pseudo-header is missing (RFC 9113 section 8.3.1)
    rule_id = rule.decode("utf-8", "replace") if rule is not None else None
    if method != b"POST":
        return (0, http_status_frame(405), rule_id, encoding)
    if ctype is None or not (ctype == b"application/grpc" or ctype.startswith((b"application/grpc+", b"application/grpc;"))):
        return (0, http_status_frame(415), rule_id, encoding)  # gRPC over HTTP/2: not gRPC
    if size > max_header_list_size:
        return (0, status_frame(GRPC_RESOURCE_EXHAUSTED, "request header list too large", False), rule_id, encoding)
    # grpc-timeout is validated only: Envoy enforces its own message timeout and resets the stream.
    if timeout is not None and not _GRPC_TIMEOUT.fullmatch(timeout):
        return (0, status_frame(GRPC_INTERNAL, "malformed grpc-timeout", False), rule_id, encoding)
    if path == method_path:
        return (PROCESS, None, rule_id, encoding)
    if path == CHECK_PATH:
        return (CHECK, None, rule_id, encoding)
    if path == WATCH_PATH:
        return (WATCH, None, rule_id, encoding)
    return (0, status_frame(GRPC_UNIMPLEMENTED, "unknown method", False), rule_id, encoding)


def health_response(status: int) -> bytes:
    """HealthCheckResponse{status}: field 1, varint; every status fits one byte."""
    return b"\x08" + bytes((status,))


def decode_service(msg: bytes) -> str | None:
    """HealthCheckRequest.service (field 1), skipping unknown fields; None if malformed."""
    service = ""
    pos, end = 0, len(msg)
    try:
        while pos < end:
            key, pos = _varint(msg, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(msg, pos)
            elif wire == 1:
                pos += 8
            elif wire == 2:
                n, pos = _varint(msg, pos)
                if field == 1:
                    service = msg[pos : pos + n].decode()
                pos += n
            elif wire == 5:
                pos += 4
            else:
                return None
            if field == 0 or pos > end:
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return service


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")

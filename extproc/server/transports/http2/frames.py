"""HTTP/2 frame codec (RFC 9113 sections 4 and 6): the numbers and the frames
the server sends, as bytes. Pure; no state."""

from __future__ import annotations

import struct
from typing import Final

import hpack

from .events import ConnectionFailure

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20
# Error codes (section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB
# SETTINGS identifiers.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)

MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_WINDOW: Final = 65535
MIN_FRAME_SIZE: Final = 1 << 14  # also our MAX_FRAME_SIZE: we never advertise more
HEADER_TABLE_SIZE: Final = 4096  # the RFC default, advertised implicitly

HEADER: Final = struct.Struct(">HBBBI")  # length (24 bits as 16 + 8), type, flags, stream id
DATA_MESSAGE: Final = struct.Struct(">HBBBIBI")  # a DATA frame header followed by a gRPC message prefix
_RST = struct.Struct(">HBBBII")
_WINDOW = struct.Struct(">HBBBII")
SETTING: Final = struct.Struct(">HI")


def frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return HEADER.pack(length >> 8, length & 0xFF, ftype, flags, sid)


def with_sid(template: bytes, sid: int) -> bytes:
    """A precomputed frame (built for stream 0) on stream ``sid``."""
    return template[:5] + sid.to_bytes(4, "big") + template[9:]


def headers_frame(headers: list[tuple[bytes, bytes]], flags: int) -> bytes:
    # A fresh Encoder per block and never-indexed literals: the peer's dynamic
    # table never changes, so no encoder state has to be kept per connection
    # and the peer's HEADER_TABLE_SIZE is honoured trivially.
    block = hpack.Encoder().encode([(k, v, True) for k, v in headers])
    return frame_header(len(block), HEADERS, flags | END_HEADERS, 0) + block


def rst_frame(sid: int, code: int) -> bytes:
    return _RST.pack(0, 4, RST_STREAM, 0, sid, code)


def window_frame(sid: int, increment: int) -> bytes:
    return _WINDOW.pack(0, 4, WINDOW_UPDATE, 0, sid, increment)


def goaway_frame(last_sid: int, code: int, debug: bytes = b"") -> bytes:
    return frame_header(8 + len(debug), GOAWAY, 0, 0) + struct.pack(">II", last_sid, code) + debug


def ping_ack(payload: bytes) -> bytes:
    return frame_header(8, PING, ACK, 0) + payload


SETTINGS_ACK: Final = frame_header(0, SETTINGS, ACK, 0)


def settings_values(payload: bytes) -> tuple[int | None, int | None]:
    """(INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE) of a SETTINGS payload (a multiple of
    6 bytes; the last value of each counts), None where absent; ConnectionFailure
    for a value section 6.5.2 forbids."""
    initial = max_frame = None
    for i in range(0, len(payload), 6):
        ident, value = SETTING.unpack_from(payload, i)
        if ident == S_INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise ConnectionFailure(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
            initial = value
        elif ident == S_MAX_FRAME_SIZE:
            if not MIN_FRAME_SIZE <= value <= (1 << 24) - 1:
                raise ConnectionFailure(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
            max_frame = value
        elif ident == S_ENABLE_PUSH and value > 1:
            raise ConnectionFailure(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
        # HEADER_TABLE_SIZE: our encoding never uses the peer's dynamic table.
        # MAX_CONCURRENT_STREAMS: we open none. MAX_HEADER_LIST_SIZE: ours are tiny.
        # Unknown settings are ignored.
    return initial, max_frame


def server_preface(max_concurrent_streams: int, stream_window: int, max_header_list_size: int, connection_window: int) -> bytes:
    """Our SETTINGS and the connection window growth, sent first on every connection."""
    return (
        frame_header(18, SETTINGS, 0, 0)
        + SETTING.pack(S_MAX_CONCURRENT_STREAMS, max_concurrent_streams)
        + SETTING.pack(S_INITIAL_WINDOW_SIZE, stream_window)
        + SETTING.pack(S_MAX_HEADER_LIST_SIZE, max_header_list_size)
        + window_frame(0, connection_window - DEFAULT_WINDOW)
    )

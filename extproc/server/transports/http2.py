"""A minimal HTTP/2 gRPC server on ``asyncio.Protocol``, for exactly the
sampler's methods: ext_proc ``Process`` (bidirectional streaming) and
grpc.health.v1 ``Check``/``Watch``.

Why not grpcio or the ``h2`` library: Envoy opens one ext_proc stream per HTTP
request, sends HEADERS and one small DATA frame, and resets the stream
(RST_STREAM CANCEL) once it has its answer. grpc.aio treats each as a
cancelled call (about 4.5x the CPU per request and a slow leak); ``h2``
remembers 2^16 closed streams per connection. Here a stream costs one
``__slots__`` object that is freed at its reset, and the CPU goes to parsing
frames from one bytes buffer and writing precomputed response frames.

Design:
- One ``_Connection`` (an ``asyncio.Protocol``) per TCP/TLS connection. Frames
  are parsed in place from the received bytes; everything one read produces
  is written with a single ``transport.write``.
- Request header blocks are decoded with ``hpack`` (every block, in order, so
  the dynamic table stays in step, even for streams that are refused or
  ignored). Responses are encoded statelessly (static table and never-indexed
  literals), so there is no encoder state and the peer's HEADER_TABLE_SIZE is
  honoured trivially; the response HEADERS and trailer frames are built once
  and only the stream id is patched in.
- Closed streams are not remembered: a stream id at or below the highest one
  seen and not in the table is closed, above it is idle. Frames on closed
  streams are therefore stream errors (RST_STREAM STREAM_CLOSED) or ignored,
  never connection errors: a late frame crossing our own RST_STREAM cannot be
  told from a misbehaving peer without remembering every closed stream.
- Streams we end while the client still sends (an early status) are ended
  with RST_STREAM NO_ERROR after the trailers (RFC 9113 section 8.1) and
  forgotten at once, so the table only holds streams the client keeps open.
- Flow control both ways. Inbound windows are given back as data is read (the
  memory bound is the message size limit and a per-connection cap on partial
  messages, not the window); outbound DATA waits per stream for window.
- Limits against hostile peers: concurrent streams (REFUSED_STREAM), header
  block and header list size, the rate of streams the peer resets before any
  request message (CVE-2023-44487: GOAWAY ENHANCE_YOUR_CALM) and of SETTINGS
  frames, output buffered for a peer that does not read (reading pauses with
  writing; past a bound the connection is dropped), partial frames (a frame
  can never exceed MAX_FRAME_SIZE, so a frame that never completes holds at
  most that much). Each of these, and every connection error, calls
  ``on_error("protocol")``; an exception escaping the code here is answered
  with GOAWAY INTERNAL_ERROR and costs only its own connection.

Deliberately out of scope: server push (a gRPC server never pushes), message
compression (``grpc-encoding`` other than identity: the compressed flag is
refused), HTTP/1.1 and h2c upgrade, priorities (PRIORITY is parsed and
ignored, as RFC 9113 allows), SETTINGS acknowledgement and idle-connection
timeouts, the TLS 1.2 cipher blocklist of RFC 9113 appendix A (the SSLContext
decides), and ``grpc-timeout`` enforcement (it is validated, but Envoy runs
its own message timeout and resets the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl as ssl_module
import struct
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Final, Protocol

import hpack
from hpack.exceptions import HPACKError, OversizedHeaderListError

from extproc.server.health import SERVICE_UNKNOWN, Health
from extproc.wire import PROCESS_METHOD, RULE_METADATA


class ProcessStreamLike(Protocol):
    def message(self, data: bytes) -> bytes | None: ...
    def close(self) -> None: ...


class ServicerLike(Protocol):
    def open_stream(self, rule_id: str | None) -> ProcessStreamLike: ...


PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20
# Error codes (RFC 9113 section 7).
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

# gRPC status codes used here.
GRPC_OK: Final = 0
GRPC_NOT_FOUND: Final = 5
GRPC_RESOURCE_EXHAUSTED: Final = 8
GRPC_UNIMPLEMENTED: Final = 12
GRPC_INTERNAL: Final = 13
GRPC_UNAVAILABLE: Final = 14

MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_WINDOW: Final = 65535
MIN_FRAME_SIZE: Final = 1 << 14  # also our MAX_FRAME_SIZE: we never advertise more
HEADER_TABLE_SIZE: Final = 4096  # the RFC default, advertised implicitly

# Limits; module-level so an operator (or a test) can see and change them.
MAX_CONCURRENT_STREAMS = 1000
STREAM_WINDOW = 1 << 20  # per-stream receive window we advertise
CONNECTION_WINDOW = 1 << 24  # connection receive window we grow to at start
MAX_HEADER_LIST_SIZE = 16384  # advertised; a larger request is answered RESOURCE_EXHAUSTED
HARD_HEADER_LIST_SIZE = 4 * MAX_HEADER_LIST_SIZE  # decoding stops here: the connection goes
MAX_HEADER_BLOCK = 65536  # encoded bytes over HEADERS + CONTINUATION
MAX_CONTINUATION_FRAMES = 256  # empty CONTINUATION frames cost CPU without growing the block
MAX_PARTIAL_BYTES = 16 << 20  # partial gRPC messages buffered per connection ...
MAX_PARTIAL_TOTAL = 64 << 20  # ... and across all connections
MAX_CONNECTIONS = 1024  # Envoy keeps a few per worker thread; more is a peer holding sockets
PREFACE_TIMEOUT = 10.0  # seconds a new connection gets to send the preface and its SETTINGS
IDLE_TIMEOUT = 3600.0  # seconds without input and without streams before GOAWAY (Envoy's own upstream default)
SWEEP_INTERVAL = 1.0  # how often connections are checked against the two timeouts
MAX_OUTPUT_BUFFER = 8 << 20  # unsent output per connection (transport buffer + flow-control queue)
RESET_BURST = 1000.0  # streams the peer may reset before sending a message, at once ...
RESET_RATE = 200.0  # ... and per second after that
SETTINGS_BURST = 100.0  # SETTINGS frames (each may touch every open stream) at once ...
SETTINGS_RATE = 10.0  # ... and per second after that
CLOSE_LINGER = 1.0  # seconds a connection in error stays half-open so the peer reads the GOAWAY

_HDR = struct.Struct(">HBBBI")  # length (24 bits as 16 + 8), type, flags, stream id
_DATA_MSG = struct.Struct(">HBBBIBI")  # a DATA frame header followed by a gRPC message prefix
_RST = struct.Struct(">HBBBII")
_WINDOW = struct.Struct(">HBBBII")
_SETTING = struct.Struct(">HI")

PROCESS_PATH: Final = PROCESS_METHOD.encode()
CHECK_PATH: Final = b"/grpc.health.v1.Health/Check"
WATCH_PATH: Final = b"/grpc.health.v1.Health/Watch"
RULE_KEY: Final = RULE_METADATA.encode()

PROCESS, CHECK, WATCH = range(3)

# RFC 9110 token characters, lowercase only: RFC 9113 section 8.2.1 makes an
# uppercase field name malformed.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_GRPC_TIMEOUT = re.compile(rb"[0-9]{1,8}[HMSmun]")
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))


def _frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return _HDR.pack(length >> 8, length & 0xFF, ftype, flags, sid)


def _with_sid(template: bytes, sid: int) -> bytes:
    return template[:5] + sid.to_bytes(4, "big") + template[9:]


def _headers_frame(headers: list[tuple[bytes, bytes]], flags: int) -> bytes:
    # A fresh Encoder per block and never-indexed literals: the peer's dynamic
    # table never changes, so no encoder state has to be kept per connection.
    block = hpack.Encoder().encode([(k, v, True) for k, v in headers])
    return _frame_header(len(block), HEADERS, flags | END_HEADERS, 0) + block


def _pct(message: str) -> bytes:
    # grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in message.encode())


_OK_HEADERS: Final = [(b":status", b"200"), (b"content-type", b"application/grpc")]
RESPONSE_HEADERS: Final = _headers_frame(_OK_HEADERS, 0)
TRAILERS_OK: Final = _headers_frame([(b"grpc-status", b"0")], END_STREAM)
SETTINGS_ACK: Final = _frame_header(0, SETTINGS, ACK, 0)
SERVER_PREFACE: Final = (
    _frame_header(18, SETTINGS, 0, 0)
    + _SETTING.pack(S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS)
    + _SETTING.pack(S_INITIAL_WINDOW_SIZE, STREAM_WINDOW)
    + _SETTING.pack(S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE)
    + _WINDOW.pack(0, 4, WINDOW_UPDATE, 0, 0, CONNECTION_WINDOW - DEFAULT_WINDOW)
)


@lru_cache(maxsize=64)
def _status_frame(status: int, message: str, headers_sent: bool) -> bytes:
    """Trailers (after response HEADERS) or a trailers-only response, stream id 0."""
    fields = [] if headers_sent else list(_OK_HEADERS)
    fields.append((b"grpc-status", str(status).encode()))
    if message:
        fields.append((b"grpc-message", _pct(message)))
    if status == GRPC_UNIMPLEMENTED and message.startswith("compressed"):
        fields.append((b"grpc-accept-encoding", b"identity"))
    return _headers_frame(fields, END_STREAM)


@lru_cache(maxsize=8)
def _http_status_frame(status: int) -> bytes:
    return _headers_frame([(b":status", str(status).encode())], END_STREAM)


def _rst_frame(sid: int, code: int) -> bytes:
    return _RST.pack(0, 4, RST_STREAM, 0, sid, code)


def _window_frame(sid: int, increment: int) -> bytes:
    return _WINDOW.pack(0, 4, WINDOW_UPDATE, 0, sid, increment)


def _health_response(status: int) -> bytes:
    # HealthCheckResponse{status}: field 1, varint; every status fits one byte.
    return b"\x08" + bytes((status,))


def _decode_service(msg: bytes) -> str | None:
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


# What a request's header list asks for: (method kind, a complete answer for a
# request that is not served (or None), the rule id, a non-identity encoding);
# None for a malformed request (RFC 9113 section 8.2: RST_STREAM PROTOCOL_ERROR).
_Request = tuple[int, bytes | None, str | None, bool]


def _check_request(headers: list[tuple[bytes, bytes]]) -> _Request | None:
    """The request header validation of RFC 9113 and gRPC over HTTP/2 (pure)."""
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
        if k == RULE_KEY:
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
        return (0, _http_status_frame(405), rule_id, encoding)
    if ctype is None or not (ctype == b"application/grpc" or ctype.startswith((b"application/grpc+", b"application/grpc;"))):
        return (0, _http_status_frame(415), rule_id, encoding)  # gRPC over HTTP/2: not gRPC
    if size > MAX_HEADER_LIST_SIZE:
        return (0, _status_frame(GRPC_RESOURCE_EXHAUSTED, "request header list too large", False), rule_id, encoding)
    # grpc-timeout is validated only: Envoy enforces its own message timeout and resets the stream.
    if timeout is not None and not _GRPC_TIMEOUT.fullmatch(timeout):
        return (0, _status_frame(GRPC_INTERNAL, "malformed grpc-timeout", False), rule_id, encoding)
    if path == PROCESS_PATH:
        return (PROCESS, None, rule_id, encoding)
    if path == CHECK_PATH:
        return (CHECK, None, rule_id, encoding)
    if path == WATCH_PATH:
        return (WATCH, None, rule_id, encoding)
    return (0, _status_frame(GRPC_UNIMPLEMENTED, "unknown method", False), rule_id, encoding)


class _BlockDecoder:
    """HPACK decoding (the ``hpack`` library) that remembers the header blocks
    which only read the dynamic table.

    Envoy's encoder indexes its ext_proc request headers, so once a
    connection is warm nearly every block is the same dozen index bytes, which
    ``hpack`` takes about 18 µs to decode (a third of the sampler's CPU per
    request). A block that neither added to nor evicted from the table decodes
    to the same headers for as long as the table is unchanged, so its result
    is replayed for the same bytes in the same table state. The table changes
    only by additions (counted here) and evictions (which shrink it), so
    (additions, entries) identifies its state; a block that changed the table
    is never replayed.
    """

    __slots__ = ("hpack", "entries", "additions", "cache", "checks")

    CACHED_BLOCKS = 64  # per connection: Envoy's blocks differ by little more than the rule id
    CACHED_BLOCK_BYTES = 512

    def __init__(self) -> None:
        self.hpack = hpack.Decoder(max_header_list_size=HARD_HEADER_LIST_SIZE)
        self.hpack.max_allowed_table_size = HEADER_TABLE_SIZE
        table = self.hpack.header_table
        self.entries = table.dynamic_entries
        self.additions = 0
        add = table.add

        def counting_add(name: bytes, value: bytes) -> None:
            self.additions += 1
            add(name, value)

        table.add = counting_add  # type: ignore[method-assign]  # an instance attribute: this decoder's table only
        self.cache: dict[bytes, tuple[tuple[int, int], list[tuple[bytes, bytes]]]] = {}
        # _check_request of a replayed header list, by the list's identity (the
        # value keeps the list alive, so its id cannot be reused meanwhile).
        self.checks: dict[int, tuple[list[tuple[bytes, bytes]], _Request | None]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's headers (raw bytes); HPACKError as ``hpack`` raises it."""
        state = (self.additions, len(self.entries))
        hit = self.cache.get(block)
        if hit is not None and hit[0] == state:
            return hit[1]
        headers: list[tuple[bytes, bytes]] = self.hpack.decode(block, raw=True)  # type: ignore[assignment]
        if (self.additions, len(self.entries)) == state and len(block) <= self.CACHED_BLOCK_BYTES:
            if len(self.cache) >= self.CACHED_BLOCKS:
                self.cache.clear()
            self.cache[block] = (state, headers)
        return headers

    def checked(self, headers: list[tuple[bytes, bytes]]) -> _Request | None:
        """``_check_request(headers)``, computed once per remembered header list."""
        memo = self.checks.get(id(headers))
        if memo is not None and memo[0] is headers:
            return memo[1]
        request = _check_request(headers)
        if len(self.checks) >= self.CACHED_BLOCKS:
            self.checks.clear()
        self.checks[id(headers)] = (headers, request)
        return request


class _ConnectionError(Exception):
    """A connection error (RFC 9113 section 5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Stream:
    __slots__ = (
        "sid",
        "kind",
        "proc",
        "buf",
        "headers_sent",
        "remote_closed",
        "got_message",
        "compressed_ok",
        "send_window",
        "recv_window",
        "recv_unacked",
        "pending",
        "trailer",
        "service",
        "sent_status",
    )

    def __init__(self, sid: int, kind: int, send_window: int) -> None:
        self.sid = sid
        self.kind = kind
        self.proc: ProcessStreamLike | None = None
        self.buf: bytes | bytearray = b""  # a partial gRPC message
        self.headers_sent = False
        self.remote_closed = False  # END_STREAM received: half-closed (remote)
        self.got_message = False
        self.compressed_ok = False  # the client named a grpc-encoding (so a compressed message is UNIMPLEMENTED, not INTERNAL)
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.recv_unacked = 0
        self.pending = bytearray()  # DATA payload waiting for flow-control window
        self.trailer: bytes | None = None  # trailers to send once ``pending`` drains
        self.service = ""
        self.sent_status = -1


class _Connection(asyncio.Protocol):
    def __init__(self, owner: Http2Transport) -> None:
        self.owner = owner
        self.servicer = owner.servicer
        self.health = owner.health
        self.max_message = owner.max_message_bytes
        self.transport: asyncio.Transport | None = None
        self.decoder = _BlockDecoder()
        self.streams: dict[int, _Stream] = {}
        self.watches: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}  # streams with DATA waiting for window
        self.inbuf = b""
        self.preface_ok = False
        self.expect_settings = True
        self.highest = 0  # highest client stream id seen: lower unknown ids are closed, higher are idle
        self.goaway_sid: int | None = None  # set once we sent GOAWAY
        self.peer_goaway = False
        self.dead = False  # no further input is processed
        self.close_when_idle = False
        self.recv_window = CONNECTION_WINDOW
        self.recv_unacked = 0
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = MIN_FRAME_SIZE
        self.pending_bytes = 0
        self.partial_bytes = 0
        self.cont_sid = 0  # stream whose header block continues in CONTINUATION frames
        self.cont_end = 0
        self.cont_frames = 0
        self.cont_block = bytearray()
        self.reset_tokens = RESET_BURST
        self.reset_at = time.monotonic()
        self.settings_tokens = SETTINGS_BURST
        self.settings_at = self.reset_at
        self.window_opened = False  # the peer granted window: blocked streams are retried once per read
        self.linger: asyncio.TimerHandle | None = None
        self.opened_at = self.reset_at  # for the preface timeout (Http2Transport._sweep)
        self.last_input = self.reset_at  # for the idle timeout (Http2Transport._sweep)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.owner.connections) >= MAX_CONNECTIONS:
            # Before anything is read or allocated for it: a peer opening
            # sockets by the thousand costs a file descriptor each, no more.
            self.dead = True
            self.owner._error("protocol")
            transport.abort()
            return
        self.owner.connections.add(self)
        transport.write(SERVER_PREFACE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        for st in list(self.streams.values()):
            self._drop(st)
        self.inbuf = b""
        self.owner._forget(self)

    def eof_received(self) -> bool | None:
        return False  # the peer is gone: close our side too

    def pause_writing(self) -> None:
        # A peer that does not read gets no more work done for it: stop reading its requests.
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        self.last_input = time.monotonic()
        try:
            self._received(data)
        except Exception as e:  # noqa: BLE001
            # A bug or an unforeseen input must cost this connection only.
            self._fail(INTERNAL_ERROR, f"internal error: {type(e).__name__}")

    # Input

    def _received(self, data: bytes) -> None:
        buf = self.inbuf + data if self.inbuf else data
        if not self.preface_ok:
            n = min(len(buf), len(PREFACE))
            if buf[:n] != PREFACE[:n]:
                self._fail(PROTOCOL_ERROR, "invalid connection preface")
                return
            if n < len(PREFACE):
                self.inbuf = buf
                return
            self.preface_ok = True
            buf = buf[len(PREFACE) :]
        out: list[bytes] = []
        pos, end = 0, len(buf)
        streams = self.streams
        try:
            while end - pos >= 9:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                if length > MIN_FRAME_SIZE:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                if end - pos < 9 + length:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                if self.expect_settings:
                    if ftype != SETTINGS or flags & ACK:
                        raise _ConnectionError(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
                    self.expect_settings = False
                if self.cont_sid:
                    self._continuation(ftype, flags, sid, payload, out)
                elif ftype == DATA:
                    st = streams.get(sid)
                    if st is None:
                        self._data_no_stream(sid, length, out)
                    else:
                        self._data(st, flags, payload, out)
                elif ftype == HEADERS:
                    self._headers(flags, sid, payload, out)
                elif ftype == RST_STREAM:
                    self._rst_stream(sid, payload)
                elif ftype == WINDOW_UPDATE:
                    self._window_update(sid, payload, out)
                elif ftype == SETTINGS:
                    self._settings(flags, sid, payload, out)
                elif ftype == PING:
                    if sid:
                        raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
                    if length != 8:
                        raise _ConnectionError(FRAME_SIZE_ERROR, "PING length is not 8")
                    if not flags & ACK:
                        out.append(_frame_header(8, PING, ACK, 0) + payload)
                elif ftype == PRIORITY:
                    self._priority(sid, length, out)
                elif ftype == GOAWAY:
                    if sid:
                        raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
                    if length < 8:
                        raise _ConnectionError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                    self.peer_goaway = True
                    if not streams:
                        self.close_when_idle = True
                elif ftype == CONTINUATION:
                    raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
                elif ftype == PUSH_PROMISE:
                    raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # Unknown frame types are ignored (RFC 9113 section 4.1).
        except _ConnectionError as e:
            self._flush(out)
            self._fail(e.code, str(e))
            return
        self.inbuf = buf[pos:] if pos < end else b""
        if self.window_opened:
            # Once per read, not per frame: a flood of tiny WINDOW_UPDATEs must not
            # cost a pass over every blocked stream each.
            self.window_opened = False
            if self.blocked:
                self._flush_blocked(out)
        if self.recv_unacked >= CONNECTION_WINDOW >> 2:
            out.append(_window_frame(0, self.recv_unacked))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        self._flush(out)

    def _data_no_stream(self, sid: int, length: int, out: list[bytes]) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        if sid > self.highest:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
        # Closed stream: its DATA still counts against the connection window
        # (RFC 9113 section 6.9), and the peer is told the stream is closed.
        self._consume_connection(length)
        if self.goaway_sid is None or sid <= self.goaway_sid:
            out.append(_rst_frame(sid, STREAM_CLOSED))

    def _consume_connection(self, length: int) -> None:
        if length > self.recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= length
        self.recv_unacked += length

    def _data(self, st: _Stream, flags: int, payload: bytes, out: list[bytes]) -> None:
        length = len(payload)
        self._consume_connection(length)
        if flags & PADDED:
            if not length or payload[0] >= length:
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1 : length - payload[0]]
        if st.remote_closed:
            self._reset(st, STREAM_CLOSED, out)
            return
        if length > st.recv_window:
            self._reset(st, FLOW_CONTROL_ERROR, out)
            return
        st.recv_window -= length
        st.recv_unacked += length
        if payload:
            old = len(st.buf)
            if old:
                st.buf += payload  # a bytearray: partial messages grow without copying
                self._partial(len(payload))
                old += len(payload)
                data: bytes | bytearray = st.buf
            else:
                data = payload
            pos, end = 0, len(data)
            while end - pos >= 5:
                flag = data[pos]
                n = int.from_bytes(data[pos + 1 : pos + 5], "big")
                if flag:
                    # Compressed (or an undefined flag). gRPC over HTTP/2: a compressed message
                    # without a grpc-encoding is INTERNAL; with one we do not implement, UNIMPLEMENTED.
                    if flag == 1 and st.compressed_ok:
                        self._finish(st, GRPC_UNIMPLEMENTED, "compressed messages are not supported", out)
                    else:
                        self._finish(st, GRPC_INTERNAL, "compressed flag set without a supported grpc-encoding", out)
                    return
                if n > self.max_message:
                    self._finish(st, GRPC_RESOURCE_EXHAUSTED, f"message larger than {self.max_message} bytes", out)
                    return
                if end - pos - 5 < n:
                    break
                msg = bytes(data[pos + 5 : pos + 5 + n])
                pos += 5 + n
                self._message(st, msg, out)
                if st.sid not in self.streams:
                    return
            if pos == end:
                st.buf = b""
            elif isinstance(data, bytearray):
                del data[:pos]
            else:
                st.buf = bytearray(data[pos:])
            self._partial(len(st.buf) - old)
            if self.partial_bytes > MAX_PARTIAL_BYTES or self.owner.partial_bytes > MAX_PARTIAL_TOTAL:
                self._finish(st, GRPC_RESOURCE_EXHAUSTED, "too many partial messages buffered", out)
                return
        if flags & END_STREAM:
            st.remote_closed = True
            self._remote_end(st, out)
        elif st.recv_unacked >= STREAM_WINDOW >> 2:
            out.append(_window_frame(st.sid, st.recv_unacked))
            st.recv_window += st.recv_unacked
            st.recv_unacked = 0

    def _message(self, st: _Stream, msg: bytes, out: list[bytes]) -> None:
        kind = st.kind
        if kind == PROCESS:
            st.got_message = True
            assert st.proc is not None
            try:
                answer = st.proc.message(msg)
            except Exception:  # noqa: BLE001
                # The servicer's failure ends this stream, not the connection.
                self._finish(st, GRPC_INTERNAL, "the processor failed", out)
                return
            if answer is not None:
                self._send_message(st, answer, out)
            return
        if st.got_message:
            self._finish(st, GRPC_INTERNAL, "expected one request message", out)
            return
        st.got_message = True
        service = _decode_service(msg)
        if service is None:
            self._finish(st, GRPC_INTERNAL, "cannot parse HealthCheckRequest", out)
            return
        st.service = service
        if kind == WATCH:
            self.watches[st.sid] = st
            self._push_status(st, out)

    def _push_status(self, st: _Stream, out: list[bytes]) -> None:
        status = self.health.status(st.service)
        if status is None:
            status = SERVICE_UNKNOWN  # Watch on an unknown service: a status, not an error (health protocol)
        if status != st.sent_status:
            st.sent_status = status
            self._send_message(st, _health_response(status), out)

    def _remote_end(self, st: _Stream, out: list[bytes]) -> None:
        if st.buf:
            self._finish(st, GRPC_INTERNAL, "the stream ended inside a message", out)
        elif st.kind == PROCESS:
            self._finish(st, GRPC_OK, "", out)
        elif not st.got_message:
            self._finish(st, GRPC_INTERNAL, "expected one request message", out)
        elif st.kind == CHECK:
            status = self.health.status(st.service)
            if status is None:
                self._finish(st, GRPC_NOT_FOUND, "unknown service", out)
            else:
                self._send_message(st, _health_response(status), out)
                self._finish(st, GRPC_OK, "", out)
        # WATCH: a half-closed Watch keeps streaming.

    def _continuation(self, ftype: int, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if ftype != CONTINUATION or sid != self.cont_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        self.cont_block += payload
        self.cont_frames += 1
        if len(self.cont_block) > MAX_HEADER_BLOCK or self.cont_frames > MAX_CONTINUATION_FRAMES:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block = bytes(self.cont_block)
            self.cont_sid = 0
            self.cont_block = bytearray()
            self._header_block(sid, self.cont_end, block, out)

    def _headers(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if not sid & 1:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on a server-initiated (even) stream id")
        if flags & (PADDED | PRIORITY_FLAG):
            start, end = 0, len(payload)
            if flags & PADDED:
                if not end or payload[0] >= end:
                    raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
                end -= payload[0]
                start = 1
            if flags & PRIORITY_FLAG:
                start += 5
                if start > end:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[start:end]
        if flags & END_HEADERS:
            self._header_block(sid, flags & END_STREAM, payload, out)
        else:
            self.cont_sid = sid
            self.cont_end = flags & END_STREAM
            self.cont_frames = 0
            self.cont_block = bytearray(payload)

    def _header_block(self, sid: int, end: int, block: bytes, out: list[bytes]) -> None:
        # Always decode, whatever becomes of the stream: the dynamic table must stay in step.
        try:
            headers = self.decoder.decode(bytes(block))
        except OversizedHeaderListError:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header list far beyond SETTINGS_MAX_HEADER_LIST_SIZE") from None
        except HPACKError as e:
            raise _ConnectionError(COMPRESSION_ERROR, f"HPACK: {e}") from None
        st = self.streams.get(sid)
        if st is not None:
            # A second block: the client's trailers (RFC 9113 section 8.1).
            if st.remote_closed:
                self._reset(st, STREAM_CLOSED, out)
            elif not end or any(k[:1] == b":" for k, _ in headers):
                self._reset(st, PROTOCOL_ERROR, out)
            else:
                st.remote_closed = True
                self._remote_end(st, out)
            return
        if sid <= self.highest:
            if self.goaway_sid is None or sid <= self.goaway_sid:
                out.append(_rst_frame(sid, STREAM_CLOSED))
            return
        self.highest = sid
        if self.goaway_sid is not None:
            return  # after GOAWAY, newer streams are ignored; the peer retries them elsewhere
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            out.append(_rst_frame(sid, REFUSED_STREAM))
            self._charge_reset()
            return
        self._open(sid, end, headers, out)

    def _open(self, sid: int, end: int, headers: list[tuple[bytes, bytes]], out: list[bytes]) -> None:
        request = self.decoder.checked(headers)
        if request is None:
            self._malformed(sid, out)
            return
        kind, answer, rule, encoding = request
        if answer is not None:
            self._reply_only(sid, end, answer, out)
            return
        st = _Stream(sid, kind, self.peer_initial_window)
        st.compressed_ok = encoding
        if kind == PROCESS:
            try:
                st.proc = self.servicer.open_stream(rule)
            except Exception:  # noqa: BLE001
                self._reply_only(sid, end, _status_frame(GRPC_INTERNAL, "the processor failed", False), out)
                return
        self.streams[sid] = st
        if end:
            st.remote_closed = True
            self._remote_end(st, out)

    def _malformed(self, sid: int, out: list[bytes]) -> None:
        out.append(_rst_frame(sid, PROTOCOL_ERROR))
        self._charge_reset()

    def _reply_only(self, sid: int, end: int, frame: bytes, out: list[bytes]) -> None:
        """A complete response to a stream that is never opened here."""
        out.append(_with_sid(frame, sid))
        if not end:
            # The response is complete; ask the client to stop sending, without error (RFC 9113 section 8.1).
            out.append(_rst_frame(sid, NO_ERROR))

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM length is not 4")
        st = self.streams.get(sid)
        if st is None:
            if sid > self.highest:
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        # Envoy resets every stream once answered; a reset before any request
        # message is what a rapid-reset attack looks like.
        early = not st.got_message
        self._drop(st)
        if early:
            self._charge_reset()

    def _charge_reset(self) -> None:
        # A token bucket: RESET_BURST at once, RESET_RATE per second sustained.
        now = time.monotonic()
        self.reset_tokens = min(RESET_BURST, self.reset_tokens + (now - self.reset_at) * RESET_RATE) - 1.0
        self.reset_at = now
        if self.reset_tokens < 0:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many streams reset")

    def _window_update(self, sid: int, payload: bytes, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.window_opened = True
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.highest:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # closed: may cross our RST or END_STREAM (RFC 9113 section 5.1)
        if not increment:
            self._reset(st, PROTOCOL_ERROR, out)
            return
        st.send_window += increment
        if st.send_window > MAX_WINDOW:
            self._reset(st, FLOW_CONTROL_ERROR, out)
            return
        if st.pending:
            self._flush_stream(st, out)

    def _settings(self, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        length = len(payload)
        if flags & ACK:
            if length:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if length % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        # A window change touches every open stream: a SETTINGS flood would cost
        # (streams x frames), so SETTINGS frames are rationed like resets.
        now = time.monotonic()
        self.settings_tokens = min(SETTINGS_BURST, self.settings_tokens + (now - self.settings_at) * SETTINGS_RATE) - 1.0
        self.settings_at = now
        if self.settings_tokens < 0:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        initial = self.peer_initial_window
        for i in range(0, length, 6):
            ident, value = _SETTING.unpack_from(payload, i)
            if ident == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                initial = value  # only the last value in a frame matters
            elif ident == S_MAX_FRAME_SIZE:
                if not MIN_FRAME_SIZE <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE: our encoding never uses the peer's dynamic table.
            # MAX_CONCURRENT_STREAMS: we open none. MAX_HEADER_LIST_SIZE: ours are tiny.
            # Unknown settings are ignored (RFC 9113 section 6.5.2).
        delta = initial - self.peer_initial_window
        if delta:
            self.peer_initial_window = initial
            for st in self.streams.values():
                st.send_window += delta
                if st.send_window > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            if delta > 0:
                self.window_opened = True
        out.append(SETTINGS_ACK)

    def _priority(self, sid: int, length: int, out: list[bytes]) -> None:
        if sid == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if length != 5:
            st = self.streams.get(sid)
            if st is not None:
                self._reset(st, FRAME_SIZE_ERROR, out)
            else:
                out.append(_rst_frame(sid, FRAME_SIZE_ERROR))
        # Otherwise ignored (RFC 9113 section 5.3.2 deprecates the scheme), on any stream state.

    # Output

    def _send_message(self, st: _Stream, message: bytes, out: list[bytes]) -> None:
        sid = st.sid
        if not st.headers_sent:
            out.append(_with_sid(RESPONSE_HEADERS, sid))
            st.headers_sent = True
        n = len(message) + 5
        if not st.pending and n <= self.send_window and n <= st.send_window and n <= self.peer_max_frame:
            self.send_window -= n
            st.send_window -= n
            out.append(_DATA_MSG.pack(n >> 8, n & 0xFF, DATA, 0, sid, 0, len(message)) + message)
            return
        st.pending += b"\x00" + len(message).to_bytes(4, "big") + message
        self.pending_bytes += n
        self.blocked[sid] = st
        self._flush_stream(st, out)

    def _flush_stream(self, st: _Stream, out: list[bytes]) -> None:
        pending = st.pending
        while pending:
            n = min(len(pending), self.send_window, st.send_window, self.peer_max_frame)
            if n <= 0:
                return
            out.append(_frame_header(n, DATA, 0, st.sid) + pending[:n])
            del pending[:n]
            self.send_window -= n
            st.send_window -= n
            self.pending_bytes -= n
        self.blocked.pop(st.sid, None)
        if st.trailer is not None:
            out.append(st.trailer)
            st.trailer = None
            self._end(st, out)

    def _flush_blocked(self, out: list[bytes]) -> None:
        for st in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            if st.sid in self.streams:
                self._flush_stream(st, out)

    def _finish(self, st: _Stream, status: int, message: str, out: list[bytes]) -> None:
        """Send the stream's status (trailers, or trailers-only) and end it.
        Only an OK status waits for queued DATA; an error replaces it."""
        trailer = _with_sid(
            TRAILERS_OK if st.headers_sent and status == GRPC_OK else _status_frame(status, message, st.headers_sent), st.sid
        )
        if st.pending:
            if status == GRPC_OK:
                st.trailer = trailer
                return
            self.pending_bytes -= len(st.pending)
            st.pending = bytearray()
            self.blocked.pop(st.sid, None)
        out.append(trailer)
        self._end(st, out)

    def _end(self, st: _Stream, out: list[bytes]) -> None:
        if not st.remote_closed:
            out.append(_rst_frame(st.sid, NO_ERROR))  # RFC 9113 section 8.1: response complete, stop sending
        self._drop(st)

    def _reset(self, st: _Stream, code: int, out: list[bytes]) -> None:
        out.append(_rst_frame(st.sid, code))
        self._drop(st)
        # Streams the peer gets us to reset count like streams it resets itself
        # (the "MadeYouReset" variant of rapid reset).
        self._charge_reset()

    def _partial(self, change: int) -> None:
        """Bytes of partial messages held: this connection's and the transport's."""
        self.partial_bytes += change
        self.owner.partial_bytes += change

    def _drop(self, st: _Stream) -> None:
        """Forget a stream, however it ended: the one place ProcessStream.close() is called."""
        sid = st.sid
        if self.streams.pop(sid, None) is None:
            return
        if st.pending:
            self.pending_bytes -= len(st.pending)
            self.blocked.pop(sid, None)
        if st.buf:
            self._partial(-len(st.buf))
        self.watches.pop(sid, None)
        proc = st.proc
        if proc is not None:
            st.proc = None
            # The stream is gone either way; the servicer counts its own errors.
            with contextlib.suppress(Exception):
                proc.close()
        if not self.streams and (self.goaway_sid is not None or self.peer_goaway):
            self.close_when_idle = True

    def _flush(self, out: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if out:
            transport.write(b"".join(out))
            out.clear()
        if self.close_when_idle and not self.streams and not self.dead:
            self.dead = True
            transport.close()
            return
        if transport.get_write_buffer_size() + self.pending_bytes > MAX_OUTPUT_BUFFER:
            # The peer does not read (or grants no window) yet keeps us busy.
            self.dead = True
            self.owner._error("protocol")
            transport.abort()

    def _fail(self, code: int, message: str) -> None:
        """Connection error: GOAWAY, forget every stream, let the peer read it, close."""
        transport = self.transport
        self.dead = True
        self.inbuf = b""
        self.owner._error("protocol")
        for st in list(self.streams.values()):
            self._drop(st)
        if transport is None or transport.is_closing():
            return
        last = self.highest if self.goaway_sid is None else min(self.goaway_sid, self.highest)
        self.goaway_sid = last
        debug = message.encode()[:256]
        transport.write(_frame_header(8 + len(debug), GOAWAY, 0, 0) + struct.pack(">II", last, code) + debug)
        # Closing at once with unread input would make the kernel send a TCP reset,
        # which can destroy the GOAWAY before the peer reads it: half-close, keep
        # discarding input for a moment, then go.
        if transport.can_write_eof():
            transport.write_eof()
            self.linger = asyncio.get_running_loop().call_later(CLOSE_LINGER, transport.abort)
        else:
            transport.close()

    # Called by Http2Transport

    def push_health(self) -> None:
        if self.dead or not self.watches:
            return
        out: list[bytes] = []
        for st in list(self.watches.values()):
            self._push_status(st, out)
        self._flush(out)

    def drain(self) -> None:
        """Graceful stop: GOAWAY so the peer opens nothing new, end Watch streams,
        close once the remaining streams end."""
        if self.dead or self.transport is None:
            return
        out: list[bytes] = []
        if self.goaway_sid is None:
            self.goaway_sid = self.highest
            out.append(_frame_header(8, GOAWAY, 0, 0) + struct.pack(">II", self.highest, NO_ERROR))
        for st in list(self.watches.values()):
            self._finish(st, GRPC_UNAVAILABLE, "server shutting down", out)
        if not self.streams:
            self.close_when_idle = True
        self._flush(out)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Http2Transport:
    """Serves the sampler's gRPC methods over HTTP/2 (cleartext or TLS) on the running event loop."""

    def __init__(
        self,
        servicer: ServicerLike,
        health: Health,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        ssl: ssl_module.SSLContext | None = None,
        on_error: Callable[[str], None] | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.servicer = servicer
        self.health = health
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.ssl = ssl
        self.on_error = on_error
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self.partial_bytes = 0  # partial messages held across all connections
        self._sweeper: asyncio.TimerHandle | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (the kernel's choice when ``port`` is 0)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            # reuse_port: workers share one port. Without it asyncio still sets
            # SO_REUSEADDR, so a restart binds despite TIME_WAIT.
            self._server = await loop.create_server(
                lambda: _Connection(self), self.host, self.port, ssl=self.ssl, reuse_port=self.reuse_port or None
            )
        except OSError as e:
            raise OSError(f"MIRROR_LISTEN: cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self._unsubscribe = self.health.subscribe(self._health_changed)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _sweep(self) -> None:
        """Close what holds a socket and does nothing: a connection that never
        completed its preface, or one idle (no input, no stream) for too long."""
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.dead:
                continue
            if (not conn.preface_ok or conn.expect_settings) and now - conn.opened_at > PREFACE_TIMEOUT:
                self._error("protocol")
                conn.dead = True
                conn.abort()
            elif not conn.streams and now - conn.last_input > IDLE_TIMEOUT:
                conn.drain()  # GOAWAY NO_ERROR: a healthy peer simply reconnects
        if self._server is not None and self._loop is not None:
            self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def stop(self, grace: float) -> None:
        """GOAWAY on every connection, stop accepting, let open streams finish
        for up to ``grace`` seconds, then close whatever is left."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._idle = asyncio.Event()
        # A Health.set_all(False) just before stop() is still queued on the loop:
        # Watch streams must see NOT_SERVING before they are ended.
        self._push_health()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self.connections:
            # connection_lost runs on the next loop iterations.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 1.0)
        await server.wait_closed()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def stream_count(self) -> int:
        """Streams held across all connections (call on the loop's thread)."""
        return sum(len(conn.streams) for conn in self.connections)

    def _forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._idle is not None:
            self._idle.set()

    def _error(self, kind: str) -> None:
        if self.on_error is not None:
            # Counting must never break serving.
            with contextlib.suppress(Exception):
                self.on_error(kind)

    def _health_changed(self) -> None:
        # Health.set_all may run on any thread; Watch frames are written on ours.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._push_health)

    def _push_health(self) -> None:
        for conn in list(self.connections):
            conn.push_health()

"""Hostile and broken peers against the HTTP/2 transport. Each gets the RFC 9113
answer (the exact GOAWAY or RST_STREAM code where the RFC names one), costs
bounded memory, and leaves the server serving everyone else: after every case
a fresh grpcio channel's health Check succeeds."""

from __future__ import annotations

import contextlib
import multiprocessing
import select
import socket
import threading
import tracemalloc
from collections.abc import Iterator

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server.health import SERVING
from extproc.server.transports import http2
from tests.service.h2peer import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    FakeServicer,
    Peer,
    ServerThread,
    frame,
    grpc_frame,
    health_check,
    request_headers,
    server_thread,
    settings_frame,
)
from tests.support.procs import wait_until


class CountingServicer:
    """Keeps nothing per stream (for memory measurements), counts opens and closes."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0

    def open_stream(self, rule_id: str | None) -> CountingServicer:
        self.opened += 1
        return self

    def message(self, data: bytes) -> bytes | None:
        return b"\x08\x01"

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def fake() -> FakeServicer:
    return FakeServicer()


@pytest.fixture
def srv(fake: FakeServicer) -> Iterator[ServerThread]:
    with server_thread(fake, max_message_bytes=1 << 16) as s:
        yield s
        # Whatever the case did, the server still serves a fresh, well-behaved client.
        assert health_check(s.port) == SERVING


def _rst(code: int) -> bytes:
    return code.to_bytes(4, "big")


def _hostile(srv: ServerThread, payload: bytes, *, handshake: bool = True) -> tuple[int, int]:
    with Peer(srv.port) as p:
        if handshake:
            p.handshake()
        p.send(payload)
        result = p.goaway()
        assert p.closed()
    wait_until(lambda: "protocol" in srv.errors)
    return result


def test_wrong_preface(srv: ServerThread) -> None:
    assert _hostile(srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", handshake=False)[1] == PROTOCOL_ERROR


def test_preface_not_followed_by_settings(srv: ServerThread) -> None:
    assert _hostile(srv, PREFACE + frame(PING, 0, 0, b"12345678"), handshake=False)[1] == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (frame(DATA, 0, 1, b"x" * 16385), FRAME_SIZE_ERROR),  # beyond our MAX_FRAME_SIZE
        (frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00"), FRAME_SIZE_ERROR),  # not a multiple of 6
        (frame(SETTINGS, 1, 0, b"\x00\x04\x00\x00\x00\x00"), FRAME_SIZE_ERROR),  # ACK with a payload
        (frame(SETTINGS, 0, 1), PROTOCOL_ERROR),  # SETTINGS on a stream
        (settings_frame((0x5, 1 << 24)), PROTOCOL_ERROR),  # MAX_FRAME_SIZE out of range
        (settings_frame((0x2, 2)), PROTOCOL_ERROR),  # ENABLE_PUSH not 0/1
        (settings_frame((0x4, 1 << 31)), FLOW_CONTROL_ERROR),  # INITIAL_WINDOW_SIZE above 2^31-1
        (frame(PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), FRAME_SIZE_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), PROTOCOL_ERROR),  # increment 0 on the connection
        (frame(RST_STREAM, 0, 0, _rst(CANCEL)), PROTOCOL_ERROR),
        (frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
        (frame(HEADERS, END_HEADERS, 0, b"\x82"), PROTOCOL_ERROR),
        (frame(PRIORITY, 0, 0, b"\x00\x00\x00\x01\x10"), PROTOCOL_ERROR),
        (frame(GOAWAY, 0, 1, b"\x00" * 8), PROTOCOL_ERROR),
        (frame(GOAWAY, 0, 0, b"\x00" * 7), FRAME_SIZE_ERROR),
        (frame(HEADERS, END_HEADERS, 2, b"\x82"), PROTOCOL_ERROR),  # even stream id: server-initiated
        (frame(DATA, 0, 5, b"x"), PROTOCOL_ERROR),  # idle stream
        (frame(WINDOW_UPDATE, 0, 5, b"\x00\x00\x00\x01"), PROTOCOL_ERROR),  # idle stream
        (frame(RST_STREAM, 0, 5, _rst(CANCEL)), PROTOCOL_ERROR),  # idle stream
        (frame(CONTINUATION, END_HEADERS, 1, b"\x82"), PROTOCOL_ERROR),  # no header block open
        (frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02\x82"), PROTOCOL_ERROR),  # clients never push
        (frame(HEADERS, END_HEADERS | 0x8, 1, b"\x05\x82"), PROTOCOL_ERROR),  # padding beyond the frame
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), COMPRESSION_ERROR),  # HPACK garbage
        (frame(HEADERS, END_HEADERS, 1, b"\x3f\xe2\x1f"), COMPRESSION_ERROR),  # table size update 4096+ > SETTINGS
        (frame(WINDOW_UPDATE, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")), FLOW_CONTROL_ERROR),  # window overflow
    ],
)
def test_connection_errors(srv: ServerThread, payload: bytes, code: int) -> None:
    assert _hostile(srv, payload)[1] == code


def test_interrupted_header_block(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        block = p.block(request_headers())
        p.send(frame(HEADERS, 0, 1, block[:4]) + frame(PING, 0, 0, b"12345678"))
        assert p.goaway()[1] == PROTOCOL_ERROR
        p.send(frame(CONTINUATION, END_HEADERS, 1, block[4:]))  # ignored after the error
        assert p.closed()


def test_goaway_reports_last_processed_stream(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        p.open(1, end=True)
        p.open(3, end=True)
        p.send(frame(DATA, 0, 0, b"x"))
        assert p.goaway() == (3, PROTOCOL_ERROR)


def test_stream_errors_keep_the_connection(srv: ServerThread, fake: FakeServicer) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        # Frames on a closed stream (reset by the peer): RST_STREAM STREAM_CLOSED.
        p.open(1)
        p.send(frame(RST_STREAM, 0, 1, _rst(CANCEL)))
        p.data(1, grpc_frame(b"late"))
        assert p.rst(1) == STREAM_CLOSED
        p.send(frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01") + frame(RST_STREAM, 0, 1, _rst(CANCEL)))  # ignored
        p.send(frame(PRIORITY, 0, 9, b"\x00\x00\x00\x01\x10"))  # PRIORITY on an idle stream: ignored
        # HEADERS again on a stream that was used and ended: closed.
        p.open(5, end=True)
        p.headers(5)
        p.open(5, end=True)
        assert p.rst(5) == STREAM_CLOSED
        # DATA after the client's END_STREAM (half-closed remote): STREAM_CLOSED.
        p.open(7)
        p.data(7, b"", end=True)
        p.data(7, grpc_frame(b"more"))
        assert p.rst(7) == STREAM_CLOSED
        # Stream window overflow: RST_STREAM FLOW_CONTROL_ERROR.
        p.open(11)
        p.send(frame(WINDOW_UPDATE, 0, 11, (0x7FFFFFFF).to_bytes(4, "big")))
        assert p.rst(11) == FLOW_CONTROL_ERROR
        # Stream WINDOW_UPDATE of 0: RST_STREAM PROTOCOL_ERROR.
        p.open(13)
        p.send(frame(WINDOW_UPDATE, 0, 13, b"\x00\x00\x00\x00"))
        assert p.rst(13) == PROTOCOL_ERROR
        # PRIORITY with a bad length: RST_STREAM FRAME_SIZE_ERROR.
        p.open(15)
        p.send(frame(PRIORITY, 0, 15, b"\x00\x00\x00"))
        assert p.rst(15) == FRAME_SIZE_ERROR
        # Client trailers without END_STREAM: malformed.
        p.open(17)
        p.send(frame(HEADERS, END_HEADERS, 17, p.block([("x-t", "1")])))
        assert p.rst(17) == PROTOCOL_ERROR
        # A stream window pushed above 2^31-1 by SETTINGS is a connection error.
        p.open(19)
        p.send(frame(WINDOW_UPDATE, 0, 19, (0x7FFFFFFF - 65535).to_bytes(4, "big")))
        p.send(settings_frame((0x4, 65536)))
        assert p.goaway() == (19, FLOW_CONTROL_ERROR)
    wait_until(lambda: srv.stream_count() == 0)
    assert all(s.closed == 1 for s in fake.streams)


def test_a_new_stream_id_below_an_earlier_one_is_a_connection_error(srv: ServerThread) -> None:
    """Regression: RFC 9113 section 5.1.1 makes a new stream whose id is lower than
    one already opened a connection error PROTOCOL_ERROR (it was RST_STREAM STREAM_CLOSED)."""
    with Peer(srv.port) as p:
        p.handshake()
        p.open(5, end=True)
        p.headers(5)
        p.open(3, end=True)  # 3 was never used: opening 5 closed it implicitly
        assert p.goaway() == (5, PROTOCOL_ERROR)
        assert not [f for f in p.frames if f.type == RST_STREAM and f.sid == 3]


def test_continuation_flood(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        p.send(frame(HEADERS, 0, 1, p.block(request_headers())))
        with contextlib.suppress(OSError):  # the server may close while we are still flooding
            for _ in range(200):  # 200 x 16 KiB: far beyond the block limit
                p.send(frame(CONTINUATION, 0, 1, b"\x00" * 16384))
        assert p.goaway() == (0, ENHANCE_YOUR_CALM)


def test_empty_continuation_flood(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        p.send(frame(HEADERS, 0, 1, p.block(request_headers())) + frame(CONTINUATION, 0, 1) * 1000)
        assert p.goaway()[1] == ENHANCE_YOUR_CALM


def test_oversized_header_lists(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        # Beyond the advertised MAX_HEADER_LIST_SIZE: the request is refused, the connection stays.
        p.open(1, end=True, extra=[("x-big", "v" * (http2.MAX_HEADER_LIST_SIZE + 1))])
        assert p.headers(1)[0]["grpc-status"] == "8"
        p.open(3, end=True)
        assert p.headers(3)[0]["grpc-status"] == "0"
        # Far beyond it, by HPACK amplification (one byte per 4 KiB field from the dynamic table):
        # decoding stops and the connection goes.
        p.send(frame(HEADERS, END_HEADERS | END_STREAM, 5, p.encoder.encode([("x-amp", "a" * 4000)])))
        p.read_until(lambda f: f.type == RST_STREAM and f.sid == 5 or f.type == HEADERS and f.sid == 5)
        index = bytes([0x80 | 62])  # the newest dynamic table entry: the 4 KiB field
        p.send(frame(HEADERS, END_HEADERS | END_STREAM, 7, index * 100))
        assert p.goaway() == (5, ENHANCE_YOUR_CALM)


def test_settings_flood(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        for sid in range(1, 200, 2):
            p.open(sid)  # many open streams: each window change touches all of them
        flood = b"".join(settings_frame((0x4, 65535 + (i % 2))) for i in range(2000))
        with contextlib.suppress(OSError):
            p.send(flood)
        assert p.goaway() == (199, ENHANCE_YOUR_CALM)
    wait_until(lambda: srv.stream_count() == 0)


def test_window_update_flood_is_cheap(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake((0x4, 0))  # every stream blocked on its own window
        for sid in range(1, 200, 2):
            p.open(sid)
            p.data(sid, grpc_frame(b"q"))
        p.send(frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 20000)
        p.send(frame(WINDOW_UPDATE, 0, 1, (100).to_bytes(4, "big")))
        assert p.read_until(lambda f: f.type == DATA).sid == 1
        assert not p.sent_by_server(GOAWAY)


def test_max_concurrent_streams(fake: FakeServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "MAX_CONCURRENT_STREAMS", 5)
    with server_thread(fake) as srv, Peer(srv.port) as p:
        p.handshake()
        for sid in range(1, 12, 2):
            p.open(sid)
        assert p.rst(11) == REFUSED_STREAM
        wait_until(lambda: srv.stream_count() == 5)
        p.data(1, b"", end=True)  # one ends: a new one fits
        p.headers(1)
        p.open(13, end=True)
        assert p.headers(13)[0]["grpc-status"] == "0"
        assert health_check(srv.port) == SERVING


def _rapid_reset(port: int, streams: int) -> tuple[int, int]:
    with Peer(port) as p:
        p.handshake()
        burst = []
        for i in range(streams):
            sid = 2 * i + 1
            burst.append(frame(HEADERS, END_HEADERS, sid, p.block(request_headers())) + frame(RST_STREAM, 0, sid, _rst(CANCEL)))
        with contextlib.suppress(OSError):
            p.send(b"".join(burst))
        return p.goaway()


def test_rapid_reset(srv: ServerThread, fake: FakeServicer) -> None:
    """CVE-2023-44487: streams opened and reset at once. The abuser is sent away
    with ENHANCE_YOUR_CALM after a bounded number; nothing stays behind."""
    last, code = _rapid_reset(srv.port, 5000)
    assert code == ENHANCE_YOUR_CALM and last < 2 * 5000
    wait_until(lambda: srv.connection_count() == 0)
    assert srv.stream_count() == 0
    assert all(s.closed == 1 for s in fake.streams)
    assert len(fake.streams) <= http2.RESET_BURST + 100


def test_made_you_reset(srv: ServerThread) -> None:
    """Streams the peer makes the server reset (here by a WINDOW_UPDATE of 0) are rationed too."""
    with Peer(srv.port) as p:
        p.handshake()
        burst = []
        for i in range(3000):
            sid = 2 * i + 1
            burst.append(frame(HEADERS, END_HEADERS, sid, p.block(request_headers())) + frame(WINDOW_UPDATE, 0, sid, b"\x00" * 4))
        with contextlib.suppress(OSError):
            p.send(b"".join(burst))
        assert p.goaway()[1] == ENHANCE_YOUR_CALM
        assert len([f for f in p.frames if f.type == RST_STREAM]) <= http2.RESET_BURST + 100
    wait_until(lambda: srv.stream_count() == 0)


def test_rapid_reset_memory_is_bounded() -> None:
    servicer = CountingServicer()
    with server_thread(servicer) as srv:
        _rapid_reset(srv.port, 2000)  # warm-up: caches, first-connection allocations
        wait_until(lambda: srv.connection_count() == 0)
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, http2.__file__)])
            for _ in range(5):  # 10,000 streams opened and reset, over five abusive connections
                assert _rapid_reset(srv.port, 2000)[1] == ENHANCE_YOUR_CALM
            wait_until(lambda: srv.connection_count() == 0)
            after = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, http2.__file__)])
        finally:
            tracemalloc.stop()
        assert srv.stream_count() == 0
        assert servicer.opened == servicer.closed
        growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert growth < 32 * 1024, growth
        assert health_check(srv.port) == SERVING


def test_envoy_pattern_memory_is_flat() -> None:
    """10,000 streams the Envoy way (HEADERS, DATA, answer, RST_STREAM CANCEL) on one
    connection: no GOAWAY, an empty stream table, and no growth in the transport."""
    servicer = CountingServicer()
    with server_thread(servicer) as srv, Peer(srv.port) as p:
        p.handshake()
        p.send(frame(WINDOW_UPDATE, 0, 0, (1 << 30).to_bytes(4, "big")))  # Envoy grants a large connection window too
        request = grpc_frame(b"\x0a\x00")

        def burst(first: int, count: int) -> None:
            chunks = []
            for i in range(first, first + count):
                sid = 2 * i + 1
                chunks.append(frame(HEADERS, END_HEADERS, sid, p.block(request_headers())) + frame(DATA, 0, sid, request))
            p.send(b"".join(chunks))
            # Envoy resets each stream once it has the answer.
            answered = 0
            resets = []
            while answered < count:
                f = p.read_until(lambda f: f.type in (DATA, GOAWAY))
                assert f.type == DATA
                answered += 1
                resets.append(frame(RST_STREAM, 0, f.sid, _rst(CANCEL)))
                if len(p.frames) > 1000:
                    p.frames.clear()
            p.send(b"".join(resets))

        for k in range(2):
            burst(500 * k, 500)
        wait_until(lambda: servicer.closed == 1000)
        only_http2 = [tracemalloc.Filter(True, http2.__file__)]
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces(only_http2)
            for k in range(2, 12):
                burst(500 * k, 500)
            wait_until(lambda: servicer.closed == 6000)
            middle = tracemalloc.take_snapshot().filter_traces(only_http2)
            for k in range(12, 22):
                burst(500 * k, 500)
            wait_until(lambda: servicer.closed == 11000)
            after = tracemalloc.take_snapshot().filter_traces(only_http2)
        finally:
            tracemalloc.stop()
        assert srv.stream_count() == 0
        assert servicer.opened == servicer.closed == 11000
        assert not p.sent_by_server(GOAWAY)
        # The first 5,000 may still grow the stream table's capacity once; the next 5,000 add nothing.
        first = sum(stat.size_diff for stat in middle.compare_to(before, "filename"))
        second = sum(stat.size_diff for stat in after.compare_to(middle, "filename"))
        assert first < 64 * 1024, first
        assert second < 2048, second


def test_peer_that_stops_reading_is_paused(srv: ServerThread) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.port))
        s.settimeout(0.5)
        s.sendall(PREFACE + settings_frame())
        pings = frame(PING, 0, 0, b"12345678") * 4096
        sent = 0
        try:
            while sent < 64 << 20:
                s.sendall(pings)
                sent += len(pings)
        except TimeoutError:
            pass  # the server stopped reading us
        assert sent < 64 << 20

        def buffered() -> int:
            return sum(c.transport.get_write_buffer_size() for c in srv.transport.connections if c.transport is not None)

        assert srv.call(buffered) <= http2.MAX_OUTPUT_BUFFER


def test_peer_that_stops_reading_is_dropped(fake: FakeServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "MAX_OUTPUT_BUFFER", 16 * 1024)  # below asyncio's high-water mark
    with server_thread(fake) as srv, socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.port))
        s.settimeout(0.5)
        s.sendall(PREFACE + settings_frame())
        pings = frame(PING, 0, 0, b"12345678") * 4096
        try:
            for _ in range(1000):
                s.sendall(pings)
        except OSError:
            pass  # reset by the server, or it stopped reading
        wait_until(lambda: srv.connection_count() == 0)
        assert "protocol" in srv.errors
        assert health_check(srv.port) == SERVING


def test_partial_frames_hold_bounded_memory(srv: ServerThread) -> None:
    with Peer(srv.port) as partial, Peer(srv.port) as half_preface:
        partial.handshake()
        partial.send(frame(DATA, 0, 1, b"", length=16384)[:9] + b"x" * 16000)  # a frame that never completes
        half_preface.send(PREFACE[:10])
        wait_until(lambda: srv.connection_count() == 2)
        held = srv.call(lambda: sorted(len(c.inbuf) for c in srv.transport.connections))
        assert held == [10, 16009]
        assert max(held) <= 9 + 16384
        assert health_check(srv.port) == SERVING  # others are served meanwhile
        assert not partial.sent_by_server(GOAWAY)


def test_oversized_and_compressed_messages(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        p.open(1)
        p.data(1, grpc_frame(b"x" * 10)[:5] + b"\xff" * 7, end=False)  # fine so far
        p.open(3)
        p.data(3, b"\x00\xff\xff\xff\xff")  # 4 GiB announced
        assert p.headers(3)[0]["grpc-status"] == "8"
        assert p.rst(3) == 0
        p.open(5)
        p.data(5, b"\x02" + grpc_frame(b"x")[1:])  # an undefined flag
        assert p.headers(5)[0]["grpc-status"] == "13"


def test_unexpected_exception_costs_one_connection(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(http2._Connection, "_priority", broken)
    with Peer(srv.port) as bystander:
        bystander.handshake()
        bystander.open(1)
        with Peer(srv.port) as p:
            p.handshake()
            p.send(frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"))
            assert p.goaway()[1] == INTERNAL_ERROR
            assert p.closed()
        assert srv.errors == ["protocol"]
        bystander.data(1, grpc_frame(b"still"), end=True)
        assert bystander.response(1)[0] == [b"echo::still"]


def test_data_on_reset_stream_counts_against_the_connection_window(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake()
        p.open(1)
        p.send(frame(RST_STREAM, 0, 1, _rst(CANCEL)))
        for _ in range(4):
            p.data(1, b"z" * 16384)
        p.open(3)
        p.data(3, grpc_frame(b"ok"), end=True)
        assert p.response(3)[0] == [b"echo::ok"]


def test_connections_over_the_limit_are_closed_at_once(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "MAX_CONNECTIONS", 2)
    with Peer(srv.port) as first, Peer(srv.port) as second:
        first.handshake()
        second.handshake()
        wait_until(lambda: srv.connection_count() == 2)
        with Peer(srv.port) as third:
            assert third.closed()  # no preface, no SETTINGS: dropped before anything is read
            assert not third.frames
        assert srv.errors == ["protocol"]
        assert srv.connection_count() == 2
    # A slot is free again once a connection goes.
    wait_until(lambda: srv.connection_count() == 0)


def test_a_connection_that_never_completes_its_preface_is_closed(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "PREFACE_TIMEOUT", 0.2)
    with Peer(srv.port) as silent, Peer(srv.port) as half, Peer(srv.port) as polite:
        half.send(PREFACE)  # the preface, but never its SETTINGS
        polite.handshake()
        polite.open(1)  # a stream the peer keeps open: not idle, not in handshake
        assert silent.closed(timeout=5)
        assert half.closed(timeout=5)
        assert srv.errors == ["protocol", "protocol"]
        wait_until(lambda: srv.connection_count() == 1)
        assert not polite.sent_by_server(GOAWAY)


def test_an_idle_connection_gets_goaway_and_is_closed(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "IDLE_TIMEOUT", 0.3)
    with Peer(srv.port) as idle:
        idle.handshake()
        assert idle.goaway(timeout=5) == (0, NO_ERROR)
        assert idle.closed()
    assert srv.errors == []  # idleness is not an error


def test_partial_messages_are_bounded_across_connections(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "MAX_PARTIAL_TOTAL", 3000)
    with Peer(srv.port) as a, Peer(srv.port) as b:
        for p in (a, b):
            p.handshake()
            p.open(1)
        a.data(1, grpc_frame(b"x" * 4000)[:2005])  # 2000 bytes of a message held
        wait_until(lambda: srv.call(lambda: srv.transport.partial_bytes) == 2005)
        b.data(1, grpc_frame(b"y" * 4000)[:2005])  # over the transport's budget
        assert b.headers(1)[0]["grpc-status"] == "8"
        assert srv.call(lambda: srv.transport.partial_bytes) == 2005  # b's partial is freed
    wait_until(lambda: srv.call(lambda: srv.transport.partial_bytes) == 0)


class LargeAnswers:
    """Answers every message with 16 KiB: output outgrows input by far."""

    def __init__(self) -> None:
        self.opened = 0

    def open_stream(self, rule_id: str | None) -> LargeAnswers:
        self.opened += 1
        return self

    def message(self, data: bytes) -> bytes | None:
        return b"a" * 16384

    def close(self) -> None:
        pass


def _flood(port: int, zero_window: bool, stop: threading.Event, sent: list[int]) -> None:
    """Requests as fast as the server takes them, never reading an answer; reconnects when dropped."""
    while not stop.is_set():
        with contextlib.suppress(OSError), socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            encoder = hpack.Encoder()
            pending = PREFACE + settings_frame(*([(0x4, 0)] if zero_window else []))
            sid = 1
            while not stop.is_set():
                if not pending:
                    chunk = []
                    for _ in range(200):
                        block = encoder.encode(request_headers())
                        chunk.append(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, END_STREAM, sid, grpc_frame(b"q")))
                        sid += 2
                    pending = b"".join(chunk)
                select.select([], [s], [], 0.05)
                try:
                    n = s.send(pending)
                except BlockingIOError:
                    continue
                pending = pending[n:]
                sent[0] += n


def _flood_many(port: int, connections: int) -> None:
    """A separate process (the server's loop must not share a GIL with its attackers):
    ``connections`` flooding peers, half of them granting no window, until killed."""
    stop = threading.Event()
    sent = [0]
    floods = [threading.Thread(target=_flood, args=(port, i % 2 == 0, stop, sent), daemon=True) for i in range(connections)]
    for t in floods:
        t.start()
    for t in floods:
        t.join()


def _queued_output(srv: ServerThread) -> int:
    """What the server holds for its peers: unsent bytes and DATA waiting for window."""
    return srv.call(
        lambda: sum(c.transport.get_write_buffer_size() + c.pending_bytes for c in srv.transport.connections if c.transport is not None)
    )


def test_peers_that_never_read_hold_bounded_output_and_others_are_served() -> None:
    """Regression: a dozen connections sending requests without reading (zero
    window, or not reading the socket) made the server queue about 90 MiB and
    delayed another client's Health/Check by more than 6 s. Now each such peer is
    no longer read once its output backs up, what is queued is bounded per
    connection and in total, and a well-behaved client is answered meanwhile."""
    servicer = LargeAnswers()
    with server_thread(servicer) as srv:
        attackers = multiprocessing.get_context("spawn").Process(target=_flood_many, args=(srv.port, 12), daemon=True)
        attackers.start()
        try:
            wait_until(lambda: servicer.opened > 100, timeout=30)  # witness: the hostile peers are being served
            peak = 0
            for _ in range(30):
                peak = max(peak, _queued_output(srv))
                # A fresh client's whole exchange (connect, handshake, Check) with a deadline far below the old delay.
                with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                assert reply.status == SERVING
            assert peak <= http2.MAX_QUEUED_TOTAL, peak
        finally:
            attackers.terminate()
            attackers.join(10)

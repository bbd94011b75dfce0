"""Hostile and broken peers against the HTTP/2 transport over real sockets:
what the asyncio adapter adds to the protocol (whose answers to hostile peers
are tested in memory, tests/unit/test_http2_hostile.py): the GOAWAY reaching
the peer before the close, timers, the connection limit, back-pressure on a
peer that does not read. After every case a fresh grpcio channel's health
Check succeeds."""

from __future__ import annotations

import contextlib
import multiprocessing
import select
import socket
import threading
from collections.abc import Iterator

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server.health import SERVING
from extproc.server.transports.http2 import Limits
from extproc.server.transports.http2.protocol import Connection
from tests.service.h2peer import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
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


def test_unexpected_exception_costs_one_connection(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(Connection, "_priority", broken)
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


def test_connections_over_the_limit_are_closed_at_once(fake: FakeServicer) -> None:
    with server_thread(fake, limits=Limits(max_connections=2)) as srv:
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
        assert health_check(srv.port) == SERVING


def test_a_connection_that_never_completes_its_preface_is_closed(fake: FakeServicer) -> None:
    with (
        server_thread(fake, limits=Limits(preface_timeout=0.2, sweep_interval=0.05)) as srv,
        Peer(srv.port) as silent,
        Peer(srv.port) as half,
        Peer(srv.port) as polite,
    ):
        half.send(PREFACE)  # the preface, but never its SETTINGS
        polite.handshake()
        polite.open(1)  # a stream the peer keeps open: not idle, not in handshake
        assert silent.closed(timeout=5)
        assert half.closed(timeout=5)
        assert srv.errors == ["protocol", "protocol"]
        wait_until(lambda: srv.connection_count() == 1)
        assert not polite.sent_by_server(GOAWAY)


def test_an_idle_connection_gets_goaway_and_is_closed(fake: FakeServicer) -> None:
    with server_thread(fake, limits=Limits(idle_timeout=0.3, sweep_interval=0.05)) as srv, Peer(srv.port) as idle:
        idle.handshake()
        assert idle.goaway(timeout=5) == (0, NO_ERROR)
        assert idle.closed()
    assert srv.errors == []  # idleness is not an error


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

        assert srv.call(buffered) <= Limits().max_queued_output


def test_peer_that_stops_reading_is_dropped(fake: FakeServicer) -> None:
    limits = Limits(max_queued_output=16 * 1024)  # below the high-water mark: reached before reading stops
    with server_thread(fake, limits=limits) as srv, socket.socket() as s:
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
    """What the server holds for its peers (unsent bytes and DATA waiting for
    window), counted afresh, and checked against the transport's own count."""

    def held() -> tuple[int, int, int]:
        conns = [c for c in srv.transport.connections if c.transport is not None]
        now = sum(c.transport.get_write_buffer_size() + c.conn.pending_bytes for c in conns if c.transport is not None)
        return now, sum(c.conn.queued for c in conns), srv.transport.queued_bytes()

    now, last_counted, budget = srv.call(held)
    assert budget == last_counted  # the total is the sum of the connections' counts
    return max(now, budget)


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
            assert peak <= Limits().max_queued_total, peak
        finally:
            attackers.terminate()
            attackers.join(10)

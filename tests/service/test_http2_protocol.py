"""The HTTP/2 transport over real sockets with a well-behaved raw peer: what
the asyncio adapter adds to the protocol (whose conformance is tested in
memory, tests/unit/test_http2_protocol.py): streams over a socket, the socket
closing, graceful stop, listening, TLS settings."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.server import tls
from extproc.server.health import NOT_SERVING, SERVING, Health
from extproc.server.transports import http2
from extproc.wire import SERVICE_NAME
from tests.service.h2peer import (
    DATA,
    END_STREAM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    RST_STREAM,
    FakeServicer,
    Peer,
    ServerThread,
    frame,
    grpc_frame,
    health_check,
    server_thread,
)
from tests.support.procs import wait_until


@pytest.fixture
def fake() -> FakeServicer:
    return FakeServicer()


@pytest.fixture
def srv(fake: FakeServicer) -> Iterator[ServerThread]:
    with server_thread(fake, max_message_bytes=1 << 20) as s:
        yield s


@pytest.fixture
def peer(srv: ServerThread) -> Iterator[Peer]:
    with Peer(srv.port) as p:
        p.handshake()
        yield p


def test_envoy_pattern_reset_frees_stream(peer: Peer, srv: ServerThread, fake: FakeServicer) -> None:
    """HEADERS, one DATA, the answer, then RST_STREAM(CANCEL): what Envoy does for every request."""
    for sid in (1, 3, 5):
        peer.open(sid)
        peer.data(sid, grpc_frame(b"req"))
        peer.read_until(lambda f, sid=sid: f.type == DATA and f.sid == sid)  # type: ignore[misc]
        peer.send(frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big")))
    wait_until(lambda: srv.stream_count() == 0)
    wait_until(lambda: [s.closed for s in fake.streams] == [1, 1, 1])
    assert not [f for f in peer.frames if f.type == HEADERS and f.flags & END_STREAM]  # no trailers after a reset
    assert health_check(srv.port) == SERVING


def test_graceful_stop_lets_open_streams_finish(fake: FakeServicer) -> None:
    srv = ServerThread(fake)
    try:
        with Peer(srv.port) as p, Peer(srv.port) as idle:
            p.handshake()
            idle.handshake()
            p.open(1)
            p.data(1, grpc_frame(b"a"))
            p.read_until(lambda f: f.type == DATA)
            wait_until(lambda: srv.connection_count() == 2)
            stopping = threading.Thread(target=srv.stop, args=(5.0,))
            stopping.start()
            assert p.goaway() == (1, NO_ERROR)
            assert idle.goaway() == (0, NO_ERROR)
            assert idle.closed()  # nothing open on it: closed at once
            p.open(3)  # after GOAWAY: ignored, never processed
            p.data(1, grpc_frame(b"b"), end=True)
            messages, trailers = p.response(1)
            assert messages == [b"echo::b"] and trailers["grpc-status"] == "0"
            assert p.closed()
            stopping.join(5)
            assert not stopping.is_alive()
            assert len(fake.streams) == 1 and fake.streams[0].closed == 1
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
    finally:
        srv.close()


def test_stop_grace_expires(fake: FakeServicer) -> None:
    srv = ServerThread(fake)
    try:
        with Peer(srv.port) as p:
            p.handshake()
            p.open(1)
            wait_until(lambda: srv.stream_count() == 1)
            srv.stop(0.2)
            assert p.goaway()[1] == NO_ERROR
            assert p.closed()
            assert fake.streams[0].closed == 1
    finally:
        srv.close()


def test_listen_error_names_the_setting(fake: FakeServicer) -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def bind() -> int:
            transport = http2.Http2Transport(fake, Health(), "127.0.0.1", port)
            try:
                return await transport.start()
            finally:
                await transport.stop(0)

        with pytest.raises(OSError, match=rf"^MIRROR_LISTEN: cannot listen on 127.0.0.1:{port}: "):
            asyncio.run(bind())
    finally:
        taken.close()


def test_reuse_port_shares_a_port(fake: FakeServicer) -> None:
    async def two() -> tuple[int, int]:
        a = http2.Http2Transport(fake, Health(), "127.0.0.1", 0, reuse_port=True)
        port = await a.start()
        b = http2.Http2Transport(fake, Health(), "127.0.0.1", port, reuse_port=True)
        try:
            return port, await b.start()
        finally:
            await b.stop(0)
            await a.stop(0)

    port, again = asyncio.run(two())
    assert port == again


def test_reuse_port_option(fake: FakeServicer) -> None:
    async def options(reuse: bool) -> tuple[int, int]:
        transport = http2.Http2Transport(fake, Health(), "127.0.0.1", 0, reuse_port=reuse)
        await transport.start()
        try:
            assert transport._server is not None
            sock = transport._server.sockets[0]
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        finally:
            await transport.stop(0)

    reuse_port, reuse_addr = asyncio.run(options(False))
    assert reuse_port == 0 and reuse_addr != 0  # TIME_WAIT does not block a restart; other processes cannot share the port
    assert asyncio.run(options(True))[0] != 0


def test_goaway_from_peer_closes_when_idle(peer: Peer, srv: ServerThread) -> None:
    peer.open(1)
    wait_until(lambda: srv.stream_count() == 1)
    peer.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    peer.data(1, grpc_frame(b"last"), end=True)
    assert peer.response(1)[0] == [b"echo::last"]
    assert peer.closed()


def test_health_state() -> None:
    health = Health()
    assert health.status("") == SERVING and health.status(SERVICE_NAME) == SERVING
    assert health.status("other") is None
    calls: list[int | None] = []
    unsubscribe = health.subscribe(lambda: calls.append(health.status("")))
    health.set_all(True)  # no change: nobody is told
    health.set_all(False)
    assert calls == [NOT_SERVING]
    unsubscribe()
    unsubscribe()
    health.set_all(True)
    assert calls == [NOT_SERVING]
    assert Health(serving=False).status("") == NOT_SERVING


def test_tls_context_names_the_setting(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(OSError, match="MIRROR_TLS_CERT"):
        tls.server_ssl_context(missing, missing, None)
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    with pytest.raises(OSError, match="MIRROR_TLS_KEY"):
        tls.server_ssl_context(str(cert), missing, None)
    with pytest.raises(OSError, match="MIRROR_TLS_CLIENT_CA"):
        tls.server_ssl_context(str(cert), str(cert), missing)
    with pytest.raises(OSError, match="MIRROR_TLS_CERT/MIRROR_TLS_KEY"):
        tls.server_ssl_context(str(cert), str(cert), None)

"""The HTTP/2 transport speaking the protocol with a well-behaved raw peer:
settings, streams, messages, flow control, status codes, drain, listening."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.server import tls
from extproc.server.health import NOT_SERVING, SERVING, Health
from extproc.server.transports import http2
from extproc.wire import PROCESS_METHOD, SERVICE_NAME
from tests.service.h2peer import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PRIORITY,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
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


def test_preface_settings_and_acks(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake((0x4, 1 << 20))
        first = p.read_until(lambda f: True)
        assert first.type == SETTINGS and not first.flags
        advertised = dict(struct.unpack(">HI", first.payload[i : i + 6]) for i in range(0, len(first.payload), 6))
        assert advertised[0x3] == http2.MAX_CONCURRENT_STREAMS
        assert advertised[0x4] >= 1 << 20
        assert advertised[0x6] == http2.MAX_HEADER_LIST_SIZE
        update = p.read_until(lambda f: f.type == WINDOW_UPDATE)
        assert update.sid == 0 and int.from_bytes(update.payload, "big") > 1 << 20
        p.read_until(lambda f: f.type == SETTINGS and f.flags == 1)  # our SETTINGS acknowledged
        p.send(frame(PING, 0, 0, b"12345678") + frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10"))
        ack = p.read_until(lambda f: f.type == PING)
        assert ack.flags == 1 and ack.payload == b"12345678"
        p.send(frame(PING, 1, 0, b"ignored!"))  # a PING ACK is not answered
        p.open(1, end=False)
        p.data(1, grpc_frame(b"x"), end=True)
        assert p.response(1)[1]["grpc-status"] == "0"
        assert not [f for f in p.frames if f.type == PING and f.payload == b"ignored!"]


def test_process_stream_messages_split_and_batched(peer: Peer, srv: ServerThread, fake: FakeServicer) -> None:
    peer.open(1, extra=[("x-mirror-rule-id", "rule-7"), ("grpc-timeout", "200m")])
    two = grpc_frame(b"one") + grpc_frame(b"two")
    split = grpc_frame(b"three-split")
    peer.data(1, two + split[:3])  # two whole messages and the start of a third in one frame
    peer.data(1, split[3:8])
    peer.data(1, split[8:], end=True)
    headers, flags = peer.headers(1)
    assert headers == {":status": "200", "content-type": "application/grpc"} and not flags & END_STREAM
    messages, trailers = peer.response(1)
    assert messages == [b"echo:rule-7:one", b"echo:rule-7:two", b"echo:rule-7:three-split"]
    assert trailers == {"grpc-status": "0"}
    assert [(s.rule_id, s.closed) for s in fake.streams] == [("rule-7", 1)]
    assert srv.stream_count() == 0


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


def test_hpack_dynamic_table_and_continuation(peer: Peer, fake: FakeServicer) -> None:
    # hpack.Encoder indexes fields: later blocks refer to the dynamic table, so the
    # server must decode every block in order, including ones split in CONTINUATIONs.
    for sid in (1, 3, 5):
        block = peer.block(request_headers(extra=[("x-mirror-rule-id", f"r{sid}"), ("x-pad", "p" * 100)]))
        if sid == 3:
            peer.send(
                frame(HEADERS, 0, sid, block[:5])
                + frame(CONTINUATION, 0, sid, block[5:9])
                + frame(CONTINUATION, END_HEADERS, sid, block[9:])
            )
        else:
            peer.send(frame(HEADERS, END_HEADERS, sid, block))
        peer.data(sid, grpc_frame(b"m"), end=True)
        assert peer.response(sid)[0] == [f"echo:r{sid}:m".encode()]
    assert [s.rule_id for s in fake.streams] == ["r1", "r3", "r5"]


def test_padded_and_priority_headers_and_padded_data(peer: Peer) -> None:
    block = peer.block(request_headers())
    payload = bytes([3]) + b"\x00\x00\x00\x00\x10" + block + b"\x00" * 3
    peer.send(frame(HEADERS, END_HEADERS | 0x8 | 0x20, 1, payload))
    peer.send(frame(DATA, END_STREAM | 0x8, 1, bytes([2]) + grpc_frame(b"pad") + b"\x00\x00"))
    assert peer.response(1) == ([b"echo::pad"], {"grpc-status": "0"})


def test_end_stream_on_headers_and_none_answer(peer: Peer, fake: FakeServicer) -> None:
    peer.open(1, end=True)
    fields, flags = peer.headers(1)
    assert flags & END_STREAM and fields["grpc-status"] == "0" and fields[":status"] == "200"  # trailers-only
    peer.open(3)
    peer.data(3, grpc_frame(b"none"), end=True)  # the servicer answers None: nothing is sent
    messages, trailers = peer.response(3)
    assert messages == [] and trailers["grpc-status"] == "0"
    assert [s.closed for s in fake.streams] == [1, 1]


def test_servicer_exception_ends_only_that_stream(peer: Peer, srv: ServerThread, fake: FakeServicer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"boom"))
    _, trailers = peer.response(1)
    assert trailers["grpc-status"] == "13"
    assert peer.rst(1) == NO_ERROR  # the response is complete; the client may stop sending
    peer.open(3)
    peer.data(3, grpc_frame(b"fine"), end=True)
    assert peer.response(3)[0] == [b"echo::fine"]
    assert [s.closed for s in fake.streams] == [1, 1]
    assert srv.stream_count() == 0 and srv.errors == []


def test_open_stream_exception(srv: ServerThread) -> None:
    class Broken:
        def open_stream(self, rule_id: str | None) -> http2.ProcessStreamLike:
            raise RuntimeError("no policy")

    with server_thread(Broken()) as broken, Peer(broken.port) as p:
        p.handshake()
        p.open(1, end=True)
        fields, _ = p.headers(1)
        assert fields["grpc-status"] == "13"


def test_unknown_method_is_unimplemented(peer: Peer) -> None:
    peer.open(1, path="/no.Such/Method")
    fields, flags = peer.headers(1)
    assert flags & END_STREAM and fields["grpc-status"] == "12" and fields[":status"] == "200"
    assert peer.rst(1) == NO_ERROR


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([("grpc-timeout", "1S")], "0"),
        ([("grpc-timeout", "99999999n")], "0"),
        ([("grpc-timeout", "1x")], "13"),
        ([("grpc-timeout", "123456789S")], "13"),
    ],
)
def test_grpc_timeout_parses(peer: Peer, extra: list[tuple[str, str]], status: str) -> None:
    peer.open(1, end=True, extra=extra)
    assert peer.headers(1)[0]["grpc-status"] == status


def test_compressed_and_oversized_messages(peer: Peer, fake: FakeServicer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"zz", compressed=1))
    assert peer.headers(1)[0]["grpc-status"] == "13"  # compressed without grpc-encoding: INTERNAL
    peer.open(3, extra=[("grpc-encoding", "gzip")])
    peer.data(3, grpc_frame(b"zz", compressed=1))
    fields = peer.headers(3)[0]
    assert fields["grpc-status"] == "12" and fields["grpc-accept-encoding"] == "identity"
    peer.open(5)
    peer.data(5, b"\x00" + ((1 << 20) + 1).to_bytes(4, "big"))  # only the prefix: refused before buffering
    assert peer.headers(5)[0]["grpc-status"] == "8"
    assert [s.closed for s in fake.streams] == [1, 1, 1]


def test_client_trailers_end_the_stream(peer: Peer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"a"))
    peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, peer.block([("x-trailer", "1")])))
    assert peer.response(1) == ([b"echo::a"], {"grpc-status": "0"})


def test_stream_ending_inside_a_message(peer: Peer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"abcdef")[:7], end=True)
    assert peer.headers(1)[0]["grpc-status"] == "13"


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        ([(":method", "GET"), (":scheme", "http"), (":path", "/x")], ":405"),
        ([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("content-type", "text/plain")], ":415"),
        ([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD)], ":415"),
        ([(":method", "POST"), (":scheme", "http")], "rst"),
        ([(":method", "POST"), (":path", PROCESS_METHOD), ("content-type", "application/grpc")], "rst"),
        ([(":method", "POST"), ("content-type", "application/grpc"), (":scheme", "http"), (":path", PROCESS_METHOD)], "rst"),
        ([(":method", "POST"), (":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD)], "rst"),
        ([(":status", "200"), (":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD)], "rst"),
        ([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("Content-Type", "application/grpc")], "rst"),
        ([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("connection", "close")], "rst"),
        ([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("te", "gzip")], "rst"),
        ([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("x-bad", "a\nb")], "rst"),
    ],
)
def test_request_header_validation(peer: Peer, srv: ServerThread, fields: list[tuple[str, str]], expect: str) -> None:
    peer.send(frame(HEADERS, END_HEADERS, 1, peer.block(fields)))
    if expect == "rst":
        assert peer.rst(1) == PROTOCOL_ERROR
    else:
        got, flags = peer.headers(1)
        assert got[":status"] == expect[1:] and flags & END_STREAM
    # A malformed request is a stream error: the connection carries on.
    peer.open(3, end=True)
    assert peer.headers(3)[0]["grpc-status"] == "0"
    assert srv.stream_count() == 0


def test_outbound_flow_control_waits_for_window(srv: ServerThread) -> None:
    with Peer(srv.port) as p:
        p.handshake((0x4, 10))  # the server may send 10 bytes per stream
        p.open(1)
        p.data(1, grpc_frame(b"0123456789abcdef"), end=True)  # answer: 5 + 21 bytes
        first = p.read_until(lambda f: f.type == DATA)
        assert len(first.payload) == 10
        p.send(frame(WINDOW_UPDATE, 0, 1, (6).to_bytes(4, "big")))
        second = p.read_until(lambda f: f.type == DATA)
        assert len(second.payload) == 6
        assert not [f for f in p.frames if f.type == HEADERS and f.flags & END_STREAM]  # trailers wait for the data
        wait_until(lambda: srv.stream_count() == 1)
        # A SETTINGS change applies to open streams (RFC 9113 section 6.9.2).
        p.send(settings_frame((0x4, 1000)))
        rest = p.read_until(lambda f: f.type == DATA)
        assert first.payload + second.payload + rest.payload == grpc_frame(b"echo::0123456789abcdef")
        trailers, flags = p.headers(1)  # the response HEADERS came before the first DATA
        assert trailers == {"grpc-status": "0"} and flags & END_STREAM
        wait_until(lambda: srv.stream_count() == 0)


def test_outbound_connection_window_and_frame_size(fake: FakeServicer) -> None:
    with server_thread(fake) as srv, Peer(srv.port) as p:
        p.handshake((0x4, 1 << 20))
        p.open(1)
        big = b"x" * 70000
        for i in range(0, len(big) + 5, 16384):
            p.data(1, grpc_frame(big)[i : i + 16384])
        # The answer (70,011 bytes) exceeds the connection's default 65,535-byte window.
        got = 0
        while got < 65535:
            f = p.read_until(lambda f: f.type == DATA)
            assert len(f.payload) <= 16384
            got += len(f.payload)
        assert got == 65535
        p.send(frame(WINDOW_UPDATE, 0, 0, (100000).to_bytes(4, "big")))
        total = len(grpc_frame(b"echo::" + big))
        while got < total:
            got += len(p.read_until(lambda f: f.type == DATA).payload)
        assert got == total


def test_inbound_window_updates(peer: Peer) -> None:
    peer.open(1)
    body = grpc_frame(b"y" * 600_000)
    for i in range(0, len(body), 16384):
        peer.data(1, body[i : i + 16384])
    peer.read_until(lambda f: f.type == DATA and f.sid == 1)
    updates = [f for f in peer.frames if f.type == WINDOW_UPDATE and f.sid == 1]
    assert sum(int.from_bytes(f.payload, "big") for f in updates) >= 300_000


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


def test_goaway_from_peer_closes_when_idle(peer: Peer, srv: ServerThread) -> None:
    peer.open(1)
    wait_until(lambda: srv.stream_count() == 1)
    peer.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    peer.data(1, grpc_frame(b"last"), end=True)
    assert peer.response(1)[0] == [b"echo::last"]
    assert peer.closed()


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


def test_partial_messages_bounded_per_connection(fake: FakeServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "MAX_PARTIAL_BYTES", 1000)
    with server_thread(fake) as srv, Peer(srv.port) as p:
        p.handshake()
        p.open(1)
        p.data(1, grpc_frame(b"a" * 800)[:600])
        p.open(3)
        p.data(3, grpc_frame(b"b" * 800)[:600])  # 1,200 bytes of partial messages on one connection
        assert p.headers(3)[0]["grpc-status"] == "8"
        p.data(1, grpc_frame(b"a" * 800)[600:], end=True)
        assert p.response(1)[0] == [b"echo::" + b"a" * 800]
        wait_until(lambda: srv.stream_count() == 0)
        assert srv.call(lambda: sum(c.partial_bytes for c in srv.transport.connections)) == 0


header_lists = st.lists(
    st.tuples(
        st.sampled_from([b"x-request-id", b"x-mirror-rule-id", b"content-type", b"te", b"x-big"]),
        st.sampled_from([b"a", b"b", b"application/grpc", b"trailers", b"v" * 3000]),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(header_lists, st.booleans(), st.sampled_from([None, 0, 256, 4096])),
        min_size=1,
        max_size=12,
    )
)
def test_remembered_header_blocks_decode_exactly_as_hpack_does(steps: list[tuple[list[tuple[bytes, bytes]], bool, int | None]]) -> None:
    """The replay cache is invisible: block for block, the same headers as a
    plain hpack.Decoder, whatever the encoder indexes, repeats or evicts."""
    encoder = hpack.Encoder()
    plain = hpack.Decoder(max_header_list_size=http2.HARD_HEADER_LIST_SIZE)
    cached = http2._BlockDecoder()
    for headers, repeat, table_size in steps:
        if table_size is not None:
            encoder.header_table_size = table_size  # a size update at the start of the next block
        block = encoder.encode(headers)
        blocks = [block, block] if repeat else [block]
        for b in blocks:
            try:
                want = plain.decode(b, raw=True)
            except hpack.HPACKError:
                with pytest.raises(hpack.HPACKError):
                    cached.decode(b)
                return
            assert cached.decode(b) == want


def test_an_index_only_block_is_replayed_and_one_that_indexes_is_not() -> None:
    encoder, cached = hpack.Encoder(), http2._BlockDecoder()
    headers = [(b"x-mirror-rule-id", b"default/r/0")]
    first = encoder.encode(headers)  # a literal that adds to the dynamic table
    again = encoder.encode(headers)  # the same header, now one index byte
    assert len(again) < len(first)
    assert cached.decode(first) == headers
    added = cached.additions
    assert cached.decode(first) == headers  # decoded again: it adds a second copy, so never replayed
    assert cached.additions == added + 1
    assert first not in cached.cache
    replayed = cached.decode(again)
    assert cached.decode(again) is replayed  # served from the cache


def test_a_request_is_checked_once_per_remembered_header_list() -> None:
    decoder = http2._BlockDecoder()
    good = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", PROCESS_METHOD.encode()), (b"content-type", b"application/grpc")]
    bad = [(b":method", b"POST"), (b"connection", b"close")]
    assert decoder.checked(good) == http2._check_request(good) == (http2.PROCESS, None, None, False)
    assert decoder.checked(good) is decoder.checked(good)  # memoized by the list's identity
    assert decoder.checked(bad) is None and decoder.checked(list(bad)) is None
    assert decoder.checked(list(good)) == decoder.checked(good)

"""The HTTP/2 protocol speaking with a well-behaved peer, in memory: settings,
streams, messages, flow control, status codes, health, drain."""

from __future__ import annotations

import struct

import hpack
import pytest

from extproc.server.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, Health
from extproc.server.transports.http2 import ProcessStreamLike
from extproc.server.transports.http2.grpc import PROCESS, check_request
from extproc.server.transports.http2.hpack_replay import BlockDecoder
from extproc.server.transports.http2.limits import Limits
from extproc.wire import ACCESS_LOG_METHOD, PROCESS_METHOD, SERVICE_NAME
from tests.support.h2memory import FakeServicer, MemoryPeer
from tests.support.h2wire import (
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
    frame,
    grpc_frame,
    request_headers,
    rst_code,
    settings_frame,
)

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


@pytest.fixture
def fake() -> FakeServicer:
    return FakeServicer()


@pytest.fixture
def peer(fake: FakeServicer) -> MemoryPeer:
    p = MemoryPeer(fake)
    p.handshake()
    return p


def test_preface_settings_and_acks() -> None:
    p = MemoryPeer()
    p.handshake((0x4, 1 << 20))
    first = p.read_until(lambda f: True)
    assert first.type == SETTINGS and not first.flags
    advertised = dict(struct.unpack(">HI", first.payload[i : i + 6]) for i in range(0, len(first.payload), 6))
    limits = Limits()
    assert advertised[0x3] == limits.max_concurrent_streams
    assert advertised[0x4] == limits.stream_window
    assert advertised[0x6] == limits.max_header_list_size
    update = p.read_until(lambda f: f.type == WINDOW_UPDATE)
    assert update.sid == 0 and int.from_bytes(update.payload, "big") == limits.connection_window - 65535
    p.read_until(lambda f: f.type == SETTINGS and f.flags == 1)  # our SETTINGS acknowledged
    p.send(frame(PING, 0, 0, b"12345678") + frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10"))
    ack = p.read_until(lambda f: f.type == PING)
    assert ack.flags == 1 and ack.payload == b"12345678"
    p.send(frame(PING, 1, 0, b"ignored!"))  # a PING ACK is not answered
    p.open(1, end=False)
    p.data(1, grpc_frame(b"x"), end=True)
    assert p.response(1)[1]["grpc-status"] == "0"
    assert not [f for f in p.read_all() if f.type == PING and f.payload == b"ignored!"]


def test_process_stream_messages_split_and_batched(peer: MemoryPeer, fake: FakeServicer) -> None:
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
    assert peer.stream_count() == 0


def test_a_message_and_end_stream_in_one_frame_are_answered_in_order(peer: MemoryPeer) -> None:
    """The answer to the last message comes before the trailers its END_STREAM brings."""
    peer.open(1)
    peer.data(1, grpc_frame(b"a") + grpc_frame(b"b"), end=True)
    kinds = [(f.type, f.flags & END_STREAM) for f in peer.read_all() if f.sid == 1]
    assert kinds == [(HEADERS, 0), (DATA, 0), (DATA, 0), (HEADERS, END_STREAM)]


def test_envoy_pattern_reset_frees_stream(peer: MemoryPeer, fake: FakeServicer) -> None:
    """HEADERS, one DATA, the answer, then RST_STREAM(CANCEL): what Envoy does for every request."""
    for sid in (1, 3, 5):
        peer.open(sid)
        peer.data(sid, grpc_frame(b"req"))
        peer.read_until(lambda f, sid=sid: f.type == DATA and f.sid == sid)  # type: ignore[misc]
        peer.send(frame(RST_STREAM, 0, sid, rst_code(8)))
    assert peer.stream_count() == 0
    assert [s.closed for s in fake.streams] == [1, 1, 1]
    assert not [f for f in peer.read_all() if f.type == HEADERS and f.flags & END_STREAM]  # no trailers after a reset


def test_one_write_per_batch_of_input(peer: MemoryPeer) -> None:
    """Every answer one read produces goes out in one write."""
    writes = peer.writes
    block = peer.block(request_headers())
    peer.send(b"".join(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, 0, sid, grpc_frame(b"q")) for sid in range(1, 41, 2)))
    assert peer.writes == writes + 1
    assert len([f for f in peer.read_all() if f.type == DATA]) == 20


def test_hpack_dynamic_table_and_continuation(peer: MemoryPeer, fake: FakeServicer) -> None:
    # hpack.Encoder indexes fields: later blocks refer to the dynamic table, so the
    # server must decode every block in order, including ones split in CONTINUATIONs.
    for sid in (1, 3, 5):
        block = peer.block(
            [(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("content-type", "application/grpc"),
             ("x-mirror-rule-id", f"r{sid}"), ("x-pad", "p" * 100)]
        )  # fmt: skip
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


def test_padded_and_priority_headers_and_padded_data(peer: MemoryPeer) -> None:
    block = peer.block([(":method", "POST"), (":scheme", "http"), (":path", PROCESS_METHOD), ("content-type", "application/grpc")])
    payload = bytes([3]) + b"\x00\x00\x00\x00\x10" + block + b"\x00" * 3
    peer.send(frame(HEADERS, END_HEADERS | 0x8 | 0x20, 1, payload))
    peer.send(frame(DATA, END_STREAM | 0x8, 1, bytes([2]) + grpc_frame(b"pad") + b"\x00\x00"))
    assert peer.response(1) == ([b"echo::pad"], {"grpc-status": "0"})


def test_end_stream_on_headers_and_none_answer(peer: MemoryPeer, fake: FakeServicer) -> None:
    peer.open(1, end=True)
    fields, flags = peer.headers(1)
    assert flags & END_STREAM and fields["grpc-status"] == "0" and fields[":status"] == "200"  # trailers-only
    peer.open(3)
    peer.data(3, grpc_frame(b"none"), end=True)  # the servicer answers None: nothing is sent
    messages, trailers = peer.response(3)
    assert messages == [] and trailers["grpc-status"] == "0"
    assert [s.closed for s in fake.streams] == [1, 1]


def test_servicer_exception_ends_only_that_stream(peer: MemoryPeer, fake: FakeServicer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"boom"))
    _, trailers = peer.response(1)
    assert trailers["grpc-status"] == "13"
    assert peer.rst(1) == NO_ERROR  # the response is complete; the client may stop sending
    peer.open(3)
    peer.data(3, grpc_frame(b"fine"), end=True)
    assert peer.response(3)[0] == [b"echo::fine"]
    assert [s.closed for s in fake.streams] == [1, 1]
    assert peer.stream_count() == 0 and peer.errors == 0


def test_finished_ends_the_stream_at_once_with_ok_and_tells_the_client_to_stop(peer: MemoryPeer, fake: FakeServicer) -> None:
    """An observer that has seen all it wants ends the stream while the client
    still sends: OK, then RST_STREAM NO_ERROR, and the stream is forgotten."""
    peer.open(1)
    peer.data(1, grpc_frame(b"first"))
    peer.data(1, grpc_frame(b"finish"))  # no END_STREAM: the client would go on
    messages, trailers = peer.response(1)
    assert messages == [b"echo::first"] and trailers == {"grpc-status": "0"}
    assert peer.rst(1) == NO_ERROR
    assert peer.stream_count() == 0 and [s.closed for s in fake.streams] == [1]
    peer.data(1, grpc_frame(b"late"))  # crossing the reset: that stream only
    peer.open(3)
    peer.data(3, grpc_frame(b"finish"))
    fields, flags = peer.headers(3)
    assert flags & END_STREAM and fields["grpc-status"] == "0"  # trailers-only: nothing was answered
    assert [s.messages for s in fake.streams] == [[b"first", b"finish"], [b"finish"]]
    assert peer.errors == 0 and not peer.closed


def test_the_metadata_key_names_what_open_stream_gets(fake: FakeServicer) -> None:
    p = MemoryPeer(fake, metadata_key=b"x-mirror-sampler-capture")
    p.handshake()
    p.open(1, extra=[("x-mirror-rule-id", "rule-7"), ("x-mirror-sampler-capture", '{"side":"primary"}')], end=True)
    p.open(3, extra=[("x-mirror-rule-id", "rule-7")], end=True)
    assert p.headers(3)[0]["grpc-status"] == "0"
    assert [s.rule_id for s in fake.streams] == ['{"side":"primary"}', None]


def test_a_chosen_method_path_is_served_instead_of_process(fake: FakeServicer) -> None:
    """The observer's transport: Envoy's access log method opens a stream (its
    messages reach the servicer), ext_proc's Process is UNIMPLEMENTED, health stays."""
    p = MemoryPeer(fake, method_path=ACCESS_LOG_METHOD.encode(), closing_answer=b"")
    p.handshake()
    p.open(1, ACCESS_LOG_METHOD)
    p.data(1, grpc_frame(b"none"))
    p.data(1, grpc_frame(b"none"))
    assert [s.messages for s in fake.streams] == [[b"none", b"none"]]
    assert p.stream_count() == 1, "no answer until the client ends its stream"
    p.open(3, PROCESS_METHOD)
    fields, flags = p.headers(3)
    assert flags & END_STREAM and fields["grpc-status"] == "12"
    assert p.rst(3) == NO_ERROR
    assert len(fake.streams) == 1, "Process never reaches the servicer"
    p.open(5, CHECK)
    p.data(5, grpc_frame(b""), end=True)
    messages, trailers = p.response(5)
    assert trailers["grpc-status"] == "0" and len(messages) == 1
    p.data(1, b"", end=True)  # the client half-closes: its one (empty) response, then OK
    messages, trailers = p.response(1)
    assert (messages, trailers) == ([b""], {"grpc-status": "0"})
    assert p.stream_count() == 0 and [s.closed for s in fake.streams] == [1]
    assert p.errors == 0 and not p.closed


def test_without_a_closing_answer_a_half_close_ends_with_ok_alone(peer: MemoryPeer, fake: FakeServicer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"none"), end=True)
    messages, trailers = peer.response(1)
    assert (messages, trailers["grpc-status"]) == ([], "0")


def test_check_request_serves_the_method_path_it_is_given() -> None:
    base = [(b":method", b"POST"), (b":scheme", b"http"), (b"content-type", b"application/grpc")]

    def kind(path: str, served: bytes) -> tuple[int, bool]:
        request = check_request([(b":path", path.encode()), *base], 1 << 14, method_path=served)
        assert request is not None
        return request[0], request[1] is None

    assert kind(ACCESS_LOG_METHOD, ACCESS_LOG_METHOD.encode()) == (PROCESS, True)
    assert kind(PROCESS_METHOD, ACCESS_LOG_METHOD.encode())[1] is False  # answered at once: UNIMPLEMENTED
    assert kind(PROCESS_METHOD, PROCESS_METHOD.encode()) == (PROCESS, True)
    assert kind(ACCESS_LOG_METHOD, PROCESS_METHOD.encode())[1] is False
    assert kind(CHECK, ACCESS_LOG_METHOD.encode())[1] is True


def test_open_stream_exception() -> None:
    class Broken:
        def open_stream(self, rule_id: str | None) -> ProcessStreamLike:
            raise RuntimeError("no policy")

    p = MemoryPeer(Broken())
    p.handshake()
    p.open(1, end=True)
    fields, _ = p.headers(1)
    assert fields["grpc-status"] == "13"
    p.open(3)
    assert p.headers(3)[0]["grpc-status"] == "13"
    assert p.rst(3) == NO_ERROR
    assert p.stream_count() == 0


def test_unknown_method_is_unimplemented(peer: MemoryPeer) -> None:
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
def test_grpc_timeout_parses(peer: MemoryPeer, extra: list[tuple[str, str]], status: str) -> None:
    peer.open(1, end=True, extra=extra)
    assert peer.headers(1)[0]["grpc-status"] == status


def test_compressed_and_oversized_messages(peer: MemoryPeer, fake: FakeServicer) -> None:
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


def test_client_trailers_end_the_stream(peer: MemoryPeer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"a"))
    peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, peer.block([("x-trailer", "1")])))
    assert peer.response(1) == ([b"echo::a"], {"grpc-status": "0"})


def test_stream_ending_inside_a_message(peer: MemoryPeer) -> None:
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
def test_request_header_validation(peer: MemoryPeer, fields: list[tuple[str, str]], expect: str) -> None:
    peer.send(frame(HEADERS, END_HEADERS, 1, peer.block(fields)))
    if expect == "rst":
        assert peer.rst(1) == PROTOCOL_ERROR
    else:
        got, flags = peer.headers(1)
        assert got[":status"] == expect[1:] and flags & END_STREAM
    # A malformed request is a stream error: the connection carries on.
    peer.open(3, end=True)
    assert peer.headers(3)[0]["grpc-status"] == "0"
    assert peer.stream_count() == 0


def test_outbound_flow_control_waits_for_window() -> None:
    p = MemoryPeer()
    p.handshake((0x4, 10))  # the server may send 10 bytes per stream
    p.open(1)
    p.data(1, grpc_frame(b"0123456789abcdef"), end=True)  # answer: 5 + 21 bytes
    first = p.read_until(lambda f: f.type == DATA)
    assert len(first.payload) == 10
    p.send(frame(WINDOW_UPDATE, 0, 1, (6).to_bytes(4, "big")))
    second = p.read_until(lambda f: f.type == DATA)
    assert len(second.payload) == 6
    assert not [f for f in p.read_all() if f.type == HEADERS and f.flags & END_STREAM]  # trailers wait for the data
    assert p.stream_count() == 1
    # A SETTINGS change applies to open streams (RFC 9113 section 6.9.2).
    p.send(settings_frame((0x4, 1000)))
    rest = p.read_until(lambda f: f.type == DATA)
    assert first.payload + second.payload + rest.payload == grpc_frame(b"echo::0123456789abcdef")
    trailers, flags = p.headers(1)
    assert trailers == {"grpc-status": "0"} and flags & END_STREAM
    assert p.stream_count() == 0


def test_outbound_connection_window_and_frame_size() -> None:
    p = MemoryPeer(max_message=4 << 20)
    p.handshake((0x4, 1 << 20))
    p.open(1)
    big = b"x" * 70000
    body = grpc_frame(big)
    for i in range(0, len(body), 16384):
        p.data(1, body[i : i + 16384])
    # The answer (70,011 bytes) exceeds the connection's default 65,535-byte window.
    sent = [f for f in p.read_all() if f.type == DATA]
    assert all(len(f.payload) <= 16384 for f in sent)
    assert sum(len(f.payload) for f in sent) == 65535
    p.send(frame(WINDOW_UPDATE, 0, 0, (100000).to_bytes(4, "big")))
    sent = [f for f in p.read_all() if f.type == DATA]
    assert sum(len(f.payload) for f in sent) == len(grpc_frame(b"echo::" + big))


def test_inbound_window_updates(peer: MemoryPeer) -> None:
    peer.open(1)
    body = grpc_frame(b"y" * 600_000)
    for i in range(0, len(body), 16384):
        peer.data(1, body[i : i + 16384])
    updates = [f for f in peer.read_all() if f.type == WINDOW_UPDATE and f.sid == 1]
    assert sum(int.from_bytes(f.payload, "big") for f in updates) >= 300_000


def test_goaway_from_peer_closes_when_idle(peer: MemoryPeer) -> None:
    peer.open(1)
    peer.send(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
    assert not peer.closed
    peer.data(1, grpc_frame(b"last"), end=True)
    assert peer.response(1)[0] == [b"echo::last"]
    assert peer.closed


def test_drain_lets_open_streams_finish(peer: MemoryPeer, fake: FakeServicer) -> None:
    peer.open(1)
    peer.data(1, grpc_frame(b"a"))
    peer.conn.drain()
    peer.pump()
    assert peer.goaway() == (1, NO_ERROR)
    assert not peer.closed
    peer.open(3)  # after GOAWAY: ignored, never processed
    peer.data(1, grpc_frame(b"b"), end=True)
    messages, trailers = peer.response(1)
    assert messages == [b"echo::b"] and trailers["grpc-status"] == "0"
    assert peer.closed and len(fake.streams) == 1 and fake.streams[0].closed == 1


def test_health_check_and_watch(fake: FakeServicer) -> None:
    health = Health()
    p = MemoryPeer(fake, health=health)
    p.handshake()
    request = grpc_frame(b"\x0a" + bytes([len(SERVICE_NAME)]) + SERVICE_NAME.encode())
    p.open(1, path=CHECK)
    p.data(1, request, end=True)
    assert p.response(1) == ([bytes([8, SERVING])], {"grpc-status": "0"})
    p.open(3, path=CHECK)
    p.data(3, grpc_frame(b"\x0a\x05other"), end=True)
    assert p.headers(3)[0]["grpc-status"] == "5"  # NOT_FOUND
    p.open(5, path=WATCH)
    p.data(5, request, end=True)  # a half-closed Watch keeps streaming
    p.open(7, path=WATCH)
    p.data(7, grpc_frame(b"\x0a\x05other"))
    statuses = [f.payload[-1] for f in p.read_all() if f.type == DATA and f.sid in (5, 7)]
    assert statuses == [SERVING, SERVICE_UNKNOWN]
    health.set_all(False)
    p.service.push_health(p.conn)
    p.pump()
    assert [f.payload[-1] for f in p.read_all() if f.type == DATA and f.sid == 5][-1] == NOT_SERVING
    p.conn.drain()
    p.pump()
    assert p.headers(5)[0]["grpc-status"] == "14"  # UNAVAILABLE: the server is going
    assert p.stream_count() == 0 and not p.service.watches


def test_a_request_is_checked_once_per_remembered_header_list() -> None:
    decoder = BlockDecoder(Limits().max_header_list_size, Limits().hard_header_list_size)
    good = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", PROCESS_METHOD.encode()), (b"content-type", b"application/grpc")]
    bad = [(b":method", b"POST"), (b"connection", b"close")]
    encoder = hpack.Encoder()
    assert decoder.decode(encoder.encode(good)) == good  # the first block adds to the table: not remembered
    assert not decoder.cache and not decoder.checks
    replayed = decoder.decode(encoder.encode(good))  # index bytes only: remembered
    assert replayed == good and decoder.decode(encoder.encode(good)) is replayed
    assert decoder.checked(replayed) == check_request(good, 16384) == (PROCESS, None, None, False)
    assert decoder.checked(replayed) is decoder.checked(replayed)  # memoized by the list's identity
    # Lists the replay does not hold are checked afresh and not remembered.
    assert len(decoder.checks) == 1
    assert decoder.checked(bad) is None and decoder.checked(list(bad)) is None
    assert decoder.checked(list(good)) == decoder.checked(replayed)
    assert len(decoder.checks) == 1

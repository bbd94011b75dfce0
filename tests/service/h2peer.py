"""Helpers for the HTTP/2 transport tests: the transport on a background event
loop, a fake servicer that records its streams, and a raw-socket HTTP/2 peer
that can send anything (the hostile tests need frames no library would send)."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import hpack
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server.health import Health
from extproc.server.transports.http2 import Http2Transport
from extproc.wire import PROCESS_METHOD
from tests.support.inprocess import LoopThread

T = TypeVar("T")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 0xB


class FakeStream:
    def __init__(self, owner: FakeServicer, rule_id: str | None) -> None:
        self.owner = owner
        self.rule_id = rule_id
        self.closed = 0
        self.messages: list[bytes] = []

    def message(self, data: bytes) -> bytes | None:
        self.messages.append(data)
        if data == b"boom":
            raise RuntimeError("boom")
        if data == b"none":
            return None
        return b"echo:" + (self.rule_id or "").encode() + b":" + data

    def close(self) -> None:
        self.closed += 1


class FakeServicer:
    """Echoes each message (prefixed with the rule id); records every stream."""

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    def open_stream(self, rule_id: str | None) -> FakeStream:
        st = FakeStream(self, rule_id)
        self.streams.append(st)
        return st


class ServerThread:
    """An Http2Transport on its own event loop thread."""

    def __init__(self, servicer: Any, health: Health | None = None, **kwargs: Any) -> None:
        self.health = health or Health()
        self.errors: list[str] = []
        self.loop_thread = LoopThread("h2-test-server")
        kwargs.setdefault("on_error", self.errors.append)
        self.transport = Http2Transport(servicer, self.health, "127.0.0.1", 0, **kwargs)
        self.port = 0
        try:
            self.port = self.run(self.transport.start())
        except BaseException:
            self.close()
            raise

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return self.loop_thread.run(coro, timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (the transport's state lives there)."""
        return self.loop_thread.call(fn)

    def stream_count(self) -> int:
        return self.call(self.transport.stream_count)

    def connection_count(self) -> int:
        return self.call(lambda: len(self.transport.connections))

    def set_serving(self, serving: bool) -> None:
        self.call(lambda: self.health.set_all(serving))

    def stop(self, grace: float = 0) -> None:
        self.run(self.transport.stop(grace), timeout=grace + 10)

    def close(self) -> None:
        try:
            if self.port:
                self.stop()
        finally:
            self.loop_thread.close()


@contextmanager
def server_thread(servicer: Any, **kwargs: Any) -> Iterator[ServerThread]:
    srv = ServerThread(servicer, **kwargs)
    try:
        yield srv
    finally:
        srv.close()


def health_check(port: int, service: str = "") -> int:
    """A fresh grpcio channel's Health/Check: the server still serves."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


def grpc_frame(msg: bytes, compressed: int = 0) -> bytes:
    return bytes([compressed]) + len(msg).to_bytes(4, "big") + msg


@dataclass
class Frame:
    type: int
    flags: int
    sid: int
    payload: bytes


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def settings_frame(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def request_headers(path: str = PROCESS_METHOD, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "sampler"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *(extra or []),
    ]


class Peer:
    """A raw HTTP/2 client over a blocking socket (optionally TLS)."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.eof = False
        self.frames: list[Frame] = []  # everything read so far, in order

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, *settings: tuple[int, int]) -> None:
        self.send(PREFACE + settings_frame(*settings))

    def block(self, headers: list[tuple[str, str]]) -> bytes:
        return self.encoder.encode(headers)

    def open(self, sid: int, path: str = PROCESS_METHOD, *, end: bool = False, extra: list[tuple[str, str]] | None = None) -> None:
        block = self.block(request_headers(path, extra))
        self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block))

    def data(self, sid: int, payload: bytes, *, end: bool = False) -> None:
        self.send(frame(DATA, END_STREAM if end else 0, sid, payload))

    def _read_frame(self, deadline: float) -> Frame | None:
        while True:
            if len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + n:
                    f = Frame(self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF, self.buf[9 : 9 + n])
                    self.buf = self.buf[9 + n :]
                    self.frames.append(f)
                    return f
            if self.eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    def read_until(self, predicate: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        while True:
            f = self._read_frame(deadline)
            if f is None:
                raise EOFError(f"connection closed; frames: {[(x.type, x.flags, x.sid) for x in self.frames][-10:]}")
            if predicate(f):
                return f

    def goaway(self, timeout: float = 5.0) -> tuple[int, int]:
        """(last stream id, error code) of the server's GOAWAY."""
        f = self.read_until(lambda f: f.type == GOAWAY, timeout)
        last, code = struct.unpack(">II", f.payload[:8])
        return last & 0x7FFFFFFF, code

    def rst(self, sid: int, timeout: float = 5.0) -> int:
        f = self.read_until(lambda f: f.type == RST_STREAM and f.sid == sid, timeout)
        return int.from_bytes(f.payload, "big")

    def closed(self, timeout: float = 5.0) -> bool:
        """Reads (and keeps) frames until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while self._read_frame(deadline) is not None:
            pass
        return True

    def headers(self, sid: int, timeout: float = 5.0) -> tuple[dict[str, str], int]:
        """The next header block on ``sid``, decoded (keeps the HPACK decoder in step), and its flags."""
        f = self.read_until(lambda f: f.type == HEADERS and f.sid == sid, timeout)
        return self._decode(f.payload), f.flags

    def _decode(self, block: bytes) -> dict[str, str]:
        return dict(cast(list[tuple[str, str]], self.decoder.decode(block)))

    def response(self, sid: int, timeout: float = 5.0) -> tuple[list[bytes], dict[str, str]]:
        """Every gRPC message on ``sid`` up to its trailers; (messages, trailers)."""
        deadline = time.monotonic() + timeout
        body = b""
        trailers: dict[str, str] = {}
        while True:
            f = self.read_until(lambda f: f.sid == sid and f.type in (HEADERS, DATA, RST_STREAM), max(0.01, deadline - time.monotonic()))
            if f.type == DATA:
                body += f.payload
            elif f.type == HEADERS:
                fields = self._decode(f.payload)
                if f.flags & END_STREAM:
                    trailers = fields
                    break
            else:
                raise AssertionError(f"stream {sid} reset with {int.from_bytes(f.payload, 'big')}")
        messages = []
        while body:
            n = int.from_bytes(body[1:5], "big")
            messages.append(body[5 : 5 + n])
            body = body[5 + n :]
        return messages, trailers

    def sent_by_server(self, ftype: int) -> list[Frame]:
        return [f for f in self.frames if f.type == ftype]

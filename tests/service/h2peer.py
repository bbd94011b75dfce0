"""Helpers for the HTTP/2 transport tests over real sockets: the transport on a
background event loop and a raw-socket HTTP/2 peer (frames from
tests/support/h2wire.py, so it can send anything)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server.health import Health
from extproc.server.transports.http2 import Http2Transport
from tests.support.h2memory import FakeServicer, FakeStream
from tests.support.h2wire import (
    ACK,
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
    PADDED,
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
    Frame,
    PeerBase,
    frame,
    grpc_frame,
    request_headers,
    settings_frame,
)
from tests.support.inprocess import LoopThread

__all__ = [
    "ACK", "CANCEL", "COMPRESSION_ERROR", "CONTINUATION", "DATA", "END_HEADERS", "END_STREAM", "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR", "FRAME_SIZE_ERROR", "GOAWAY", "HEADERS", "INTERNAL_ERROR", "NO_ERROR", "PADDED", "PING", "PREFACE",
    "PRIORITY", "PROTOCOL_ERROR", "PUSH_PROMISE", "REFUSED_STREAM", "RST_STREAM", "SETTINGS", "STREAM_CLOSED", "WINDOW_UPDATE",
    "FakeServicer", "FakeStream", "Frame", "Peer", "ServerThread", "frame", "grpc_frame", "health_check", "request_headers",
    "server_thread", "settings_frame",
]  # fmt: skip

T = TypeVar("T")


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


class Peer(PeerBase):
    """A raw HTTP/2 client over a blocking socket (optionally TLS)."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
        super().__init__()
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""
        except TimeoutError:
            raise TimeoutError("no frame from the server") from None

    def closed(self, timeout: float = 5.0) -> bool:
        """Reads (and keeps) frames until the server closes the connection."""
        while self._read_frame(timeout) is not None:
            pass
        return True

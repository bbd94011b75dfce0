"""The HTTP/2 protocol with no socket: a client peer that feeds the server's
``Connection`` bytes and a clock, serves its events with the real
``StreamService``, and reads what it writes. Pure and deterministic."""

from __future__ import annotations

from typing import Any

from extproc.server.health import Health
from extproc.server.transports.http2.events import OPEN
from extproc.server.transports.http2.grpc import PROCESS_PATH, RULE_KEY
from extproc.server.transports.http2.limits import Budget, Limits
from extproc.server.transports.http2.protocol import Connection
from extproc.server.transports.http2.service import FINISHED, StreamService
from tests.support.h2wire import Frame, PeerBase


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
        if data == b"finish":
            return FINISHED
        return b"echo:" + (self.rule_id or "").encode() + b":" + data

    def close(self) -> None:
        self.closed += 1


class FakeServicer:
    """Echoes each message (prefixed with the rule id, or whatever the transport's
    metadata key named); ``none`` gets no answer, ``finish`` ends the stream
    (``FINISHED``), ``boom`` raises. Records every stream."""

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    def open_stream(self, rule_id: str | None) -> FakeStream:
        st = FakeStream(self, rule_id)
        self.streams.append(st)
        return st


class MemoryPeer(PeerBase):
    """A client of one in-memory server connection. ``unsent`` plays the socket's
    send buffer (what the server has written that the peer has not read);
    ``now`` is the clock the server is fed."""

    def __init__(
        self,
        servicer: Any = None,
        *,
        limits: Limits | None = None,
        budget: Budget | None = None,
        health: Health | None = None,
        max_message: int = 1 << 20,
        now: float = 0.0,
        metadata_key: bytes = RULE_KEY,
        method_path: bytes = PROCESS_PATH,
        closing_answer: bytes | None = None,
    ) -> None:
        super().__init__()
        self.servicer = servicer if servicer is not None else FakeServicer()
        self.health = health or Health()
        self.limits = limits or Limits()
        self.budget = budget or Budget()
        self.now = now
        self.unsent = 0
        self.conn = Connection(
            self.limits,
            self.budget,
            now,
            max_message=max_message,
            metadata_key=metadata_key,
            method_path=method_path,
            closing_answer=closing_answer,
        )
        self.service = StreamService(self.servicer, self.health)
        self.pending = b""
        self.writes = 0  # how many writes the server made (one per batch of input)
        self._collect()

    def send(self, data: bytes) -> None:
        self.conn.receive(data, self.now)
        self.pump()

    def pump(self) -> None:
        """What the adapter does with a read: serve events, write, until nothing is left."""
        while True:
            self.service.serve(self.conn)
            self._collect()
            if not self.conn.want_write or self.conn.dead:
                break

    def _collect(self) -> None:
        conn = self.conn
        while True:
            data = conn.data_to_send()
            if data:
                self.writes += 1
                self.pending += data
                self.eof = False  # in memory, "nothing more" lasts until the server writes again
            conn.written(self.unsent)
            if not conn.out:
                break

    def tick(self, now: float) -> None:
        self.now = now
        self.conn.tick(now)
        self._collect()

    def _more(self, timeout: float) -> bytes:
        data, self.pending = self.pending, b""
        return data

    def read_all(self) -> list[Frame]:
        """Every frame the server has written so far, read (and kept in ``frames``)."""
        while self._read_frame(0) is not None:
            pass
        return self.frames

    @property
    def closed(self) -> bool:
        """The server closed (or will close) this connection once its output is written."""
        return self.conn.state != OPEN

    @property
    def errors(self) -> int:
        return self.conn.errors

    def stream_count(self) -> int:
        return len(self.conn.streams)

"""The asyncio side of the HTTP/2 transport: sockets, timers, back-pressure and
the servicer. Everything about HTTP/2 itself is in protocol.py, which this
feeds with bytes and the clock and whose events it turns into servicer calls.

Why not grpcio or the ``h2`` library: Envoy opens one ext_proc stream per HTTP
request, sends HEADERS and one small DATA frame, and resets the stream
(RST_STREAM CANCEL) once it has its answer. grpc.aio treats each as a
cancelled call (about 4.5x the CPU per request and a slow leak); ``h2``
remembers 2^16 closed streams per connection. Here a stream costs one
``__slots__`` object that is freed at its reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import time
from collections.abc import Callable

from extproc.server.health import Health
from extproc.wire import PROCESS_METHOD, RULE_METADATA

from .events import ABORT, CLOSE, FAIL, OPEN
from .limits import Budget, Limits
from .protocol import Connection
from .service import ServicerLike, StreamService


class _Adapter(asyncio.Protocol):
    """One TCP/TLS connection: reads into the protocol, answers its events,
    writes what it produces (one ``transport.write`` per batch of input)."""

    def __init__(self, owner: Http2Transport) -> None:
        self.owner = owner
        self.service = StreamService(owner.servicer, owner.health)
        self.conn = Connection(
            owner.limits,
            owner.budget,
            time.monotonic(),
            max_message=owner.max_message_bytes,
            metadata_key=owner.metadata_key,
            method_path=owner.method_path,
            closing_answer=owner.closing_answer,
        )
        self.transport: asyncio.Transport | None = None
        self.reported_errors = 0
        self.write_paused = False  # the peer does not read: its input waits
        self.linger: asyncio.TimerHandle | None = None
        self.closing = False  # the protocol's close (CLOSE, FAIL, ABORT) was acted on

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        owner = self.owner
        if len(owner.connections) >= owner.limits.max_connections:
            # Before anything is read or allocated for it: a peer opening
            # sockets by the thousand costs a file descriptor each, no more.
            self.conn.dead = True
            owner._error("protocol")
            transport.abort()
            return
        owner.connections.add(self)
        transport.set_write_buffer_limits(high=owner.limits.output_high_water)
        self._write()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.conn.lost()
        self.service.close_all()
        self.owner._forget(self)

    def eof_received(self) -> bool | None:
        return False  # the peer is gone: close our side too

    def pause_writing(self) -> None:
        # A peer that does not read gets no more work done for it: its input
        # waits (even the rest of a batch in progress) until its output drains.
        self.write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._pump()  # the input that waited

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.dead:
            return
        conn.receive(data, time.monotonic())
        if not self.write_paused:
            self._pump()

    # The protocol's events

    def _pump(self) -> None:
        conn = self.conn
        try:
            while True:
                self.service.serve(conn)
                self._write()
                if not conn.want_write or self.write_paused or conn.dead:
                    break
        except Exception as e:
            # A bug or an unforeseen input must cost this connection only.
            conn.internal_error(type(e).__name__)
            self._write()

    def _write(self) -> None:
        """Write what the protocol produced, tell it what is still unsent, and act on its state."""
        transport = self.transport
        conn = self.conn
        if transport is None or transport.is_closing():
            return
        while True:
            data = conn.data_to_send()
            if data:
                transport.write(data)  # may call pause_writing
            conn.written(transport.get_write_buffer_size())
            if not conn.out:
                break
        if conn.errors != self.reported_errors:
            for _ in range(conn.errors - self.reported_errors):
                self.owner._error("protocol")
            self.reported_errors = conn.errors
        state = conn.state
        if self.closing or state == OPEN:
            return
        self.closing = True
        if state == CLOSE:
            transport.close()
        elif state == FAIL:
            # Closing at once with unread input would make the kernel send a TCP reset,
            # which can destroy the GOAWAY before the peer reads it: half-close, keep
            # discarding input for a moment, then go.
            if transport.can_write_eof():
                transport.write_eof()
                self.linger = asyncio.get_running_loop().call_later(self.owner.limits.close_linger, transport.abort)
            else:
                transport.close()
        elif state == ABORT:
            transport.abort()

    # Called by Http2Transport

    def tick(self, now: float) -> None:
        self.conn.tick(now)
        self._write()

    def push_health(self) -> None:
        if self.conn.dead or not self.service.watches:
            return
        self.service.push_health(self.conn)
        self._write()

    def drain(self) -> None:
        self.conn.drain()
        self._write()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Http2Transport:
    """Serves the sampler's gRPC methods over HTTP/2 (cleartext or TLS) on the
    running event loop; the comparison's observer too (another servicer, and
    another streaming ``method``: Envoy's access log service, whose one
    response, ``closing_answer``, is sent when the client ends its stream)."""

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
        limits: Limits | None = None,
        metadata_key: str = RULE_METADATA,
        method: str = PROCESS_METHOD,
        closing_answer: bytes | None = None,
    ) -> None:
        self.servicer = servicer
        self.health = health
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.ssl = ssl
        self.on_error = on_error
        self.max_message_bytes = max_message_bytes
        self.limits = limits or Limits()
        # The request metadata whose value ``servicer.open_stream`` gets (gRPC metadata keys are lowercase).
        self.metadata_key = metadata_key.encode()
        # The streaming method served next to health's Check and Watch (its HTTP/2 path).
        self.method_path = method.encode()
        # Sent as the stream's one response when the client half-closes (None: no message, only OK).
        self.closing_answer = closing_answer
        self.budget = Budget()  # partial messages and queued output across all connections
        self.connections: set[_Adapter] = set()
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
                lambda: _Adapter(self), self.host, self.port, ssl=self.ssl, reuse_port=self.reuse_port or None
            )
        except OSError as e:
            raise OSError(f"MIRROR_LISTEN: cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self._unsubscribe = self.health.subscribe(self._health_changed)
        self._sweeper = loop.call_later(self.limits.sweep_interval, self._sweep)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.tick(now)
        if self._server is not None and self._loop is not None:
            self._sweeper = self._loop.call_later(self.limits.sweep_interval, self._sweep)

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
        return sum(len(conn.conn.streams) for conn in self.connections)

    def queued_bytes(self) -> int:
        """Output held for peers across all connections (unsent + waiting for
        window), as last counted: what ``Limits.max_queued_total`` bounds."""
        return self.budget.queued_bytes

    def _forget(self, conn: _Adapter) -> None:
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

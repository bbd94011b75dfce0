"""The sending side of an HTTP/2 connection (pure): response frames per stream,
outbound flow control, how streams end and are forgotten."""

from __future__ import annotations

from collections import deque

from extproc.core.ratelimit import TokenBucket

from .events import CLOSED, ConnectionFailure, Event
from .frames import DATA, DATA_MESSAGE, DEFAULT_WINDOW, ENHANCE_YOUR_CALM, MIN_FRAME_SIZE, NO_ERROR, frame_header, rst_frame
from .grpc import CHECK, GRPC_NOT_FOUND, GRPC_OK, RESPONSE_HEADERS, health_response
from .limits import Budget, Limits
from .streams import Stream


class StreamOutput:
    """State and helpers shared by the protocol's input handling and the
    application's answers: what is sent, what waits for window, what ends."""

    def __init__(self, limits: Limits, budget: Budget, now: float) -> None:
        self.limits = limits
        self.budget = budget
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}  # streams with DATA waiting for window
        self.events: deque[Event] = deque()
        self.out: list[bytes] = []
        self.out_bytes = 0  # DATA bytes in ``out``: a batch of input stops producing once they pass the high-water mark
        self.send_window = DEFAULT_WINDOW
        self.peer_max_frame = MIN_FRAME_SIZE
        self.pending_bytes = 0  # DATA waiting for window
        self.partial_bytes = 0  # partial gRPC messages held
        self.goaway_sid: int | None = None  # set once we sent GOAWAY
        self.peer_goaway = False
        self.close_when_idle = False
        self.queued = 0  # unsent + waiting for window, as last counted into the budget
        self.resets = TokenBucket(limits.reset_rate, limits.reset_burst, now)
        self.now = now

    def send_message(self, sid: int, message: bytes) -> None:
        """One response message on a Process stream (ignored if the stream is gone)."""
        st = self.streams.get(sid)
        if st is not None:
            self._send_message(st, message)

    def end_stream(self, sid: int, status: int, message: str) -> None:
        """End a stream with a gRPC status (ignored if it is gone)."""
        st = self.streams.get(sid)
        if st is not None:
            self._finish(st, status, message)

    def health(self, sid: int, status: int | None) -> None:
        """The serving status for a CHECK_QUERY or WATCH_QUERY: a Check's answer (None: unknown
        service), or a Watch's current status (sent only when it changed)."""
        st = self.streams.get(sid)
        if st is None:
            return
        if st.kind == CHECK:
            if status is None:
                self._finish(st, GRPC_NOT_FOUND, "unknown service")
            else:
                self._send_message(st, health_response(status))
                self._finish(st, GRPC_OK, "")
        elif status is not None and status != st.sent_status:
            st.sent_status = status
            self._send_message(st, health_response(status))

    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        return data

    def _charge_reset(self) -> None:
        if not self.resets.take(self.now):
            raise ConnectionFailure(ENHANCE_YOUR_CALM, "too many streams reset")

    def _send_message(self, st: Stream, message: bytes) -> None:
        sid = st.sid
        out = self.out
        if not st.headers_sent:
            out.append(RESPONSE_HEADERS[:5] + sid.to_bytes(4, "big") + RESPONSE_HEADERS[9:])
            st.headers_sent = True
        n = len(message) + 5
        if not st.pending and n <= self.send_window and n <= st.send_window and n <= self.peer_max_frame:
            self.send_window -= n
            st.send_window -= n
            self.out_bytes += n
            out.append(DATA_MESSAGE.pack(n >> 8, n & 0xFF, DATA, 0, sid, 0, len(message)) + message)
            return
        st.pending += b"\x00" + len(message).to_bytes(4, "big") + message
        self.pending_bytes += n
        self.blocked[sid] = st
        self._flush_stream(st)

    def _flush_stream(self, st: Stream) -> None:
        pending = st.pending
        while pending:
            n = min(len(pending), self.send_window, st.send_window, self.peer_max_frame)
            if n <= 0:
                return
            self.out.append(frame_header(n, DATA, 0, st.sid) + pending[:n])
            self.out_bytes += n
            del pending[:n]
            self.send_window -= n
            st.send_window -= n
            self.pending_bytes -= n
        self.blocked.pop(st.sid, None)
        if st.trailer is not None:
            self.out.append(st.trailer)
            st.trailer = None
            self._end(st)

    def _finish(self, st: Stream, status: int, message: str) -> None:
        """Send the stream's status (trailers, or trailers-only) and end it.
        Only an OK status waits for queued DATA; an error replaces it."""
        trailer = st.trailers(status, message)
        if st.pending:
            if status == GRPC_OK:
                st.trailer = trailer
                return
            self.pending_bytes -= len(st.pending)
            st.pending = bytearray()
            self.blocked.pop(st.sid, None)
        self.out.append(trailer)
        self._end(st)

    def _end(self, st: Stream) -> None:
        if not st.remote_closed:
            self.out.append(rst_frame(st.sid, NO_ERROR))  # section 8.1: response complete, stop sending
        self._drop(st)

    def _reset(self, st: Stream, code: int) -> None:
        self.out.append(rst_frame(st.sid, code))
        self._drop(st)
        # Streams the peer gets us to reset count like streams it resets itself
        # (the "MadeYouReset" variant of rapid reset).
        self._charge_reset()

    def _partial(self, change: int) -> None:
        """Bytes of partial messages held: this connection's and the transport's."""
        self.partial_bytes += change
        self.budget.partial_bytes += change

    def _drop(self, st: Stream) -> None:
        """Forget a stream, however it ended: the one place a CLOSED event is made."""
        sid = st.sid
        if self.streams.pop(sid, None) is None:
            return
        if st.pending:
            self.pending_bytes -= len(st.pending)
            self.blocked.pop(sid, None)
        if st.buf:
            self._partial(-len(st.buf))
        if st.announced:
            self.events.append((CLOSED, sid, None))
        if not self.streams and (self.goaway_sid is not None or self.peer_goaway):
            self.close_when_idle = True

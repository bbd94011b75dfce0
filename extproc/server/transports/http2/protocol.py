"""The server side of one HTTP/2 connection carrying the sampler's gRPC
methods, as a state machine with no I/O (the h11 / h2 way): bytes and the
clock go in (``receive(data, now)``), events come out (``next_event()``), the
application answers through methods (``send_message``, ``end_stream``,
``health``), and bytes to write come out (``data_to_send()``). No sockets, no
asyncio, no servicer: the adapter (adapter.py) owns those.

Events are pulled one at a time and kept in order with the protocol's own
steps: an END_STREAM right after a message ends the stream after the message
is answered.

Design (RFC 9113 section numbers):
- Request header blocks are decoded in order, every one, even for streams
  that are refused or ignored, so the HPACK table stays in step
  (hpack_replay.py). Responses use precomputed frames with only the stream id
  patched in (grpc.py).
- Closed streams are not remembered: a stream id at or below the highest one
  seen and not in the table is closed, above it is idle. Frames on closed
  streams are stream errors (STREAM_CLOSED) or ignored, never connection
  errors: a late frame crossing our own RST_STREAM cannot be told from a
  misbehaving peer without remembering every closed stream. The ids a peer
  skips are remembered (a few ranges): a HEADERS on one of those opens a
  stream out of order, a connection error PROTOCOL_ERROR (section 5.1.1).
- Streams we end while the client still sends (an early status) are ended
  with RST_STREAM NO_ERROR after the trailers (section 8.1) and forgotten at
  once, so the table only holds streams the client keeps open.
- Flow control both ways. Inbound windows are given back as data is read (the
  memory bound is the message size limit and the partial-message budgets,
  not the window); outbound DATA waits per stream for window.
- Every bound against a hostile peer is in limits.py.

Deliberately out of scope: server push, message compression (the compressed
flag is refused), HTTP/1.1 and h2c upgrade, priorities (PRIORITY is parsed
and ignored, as section 5.3.2 allows), SETTINGS acknowledgement timeouts, the
TLS 1.2 cipher blocklist of appendix A (the SSLContext decides), and
``grpc-timeout`` enforcement (validated; Envoy runs its own timeout and resets
the stream).
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import HPACKError, OversizedHeaderListError

from extproc.core.ratelimit import TokenBucket

from .events import ABORT, CHECK_QUERY, CLOSE, FAIL, INPUT_ENDED, MESSAGE, OPEN, REQUEST, WATCH_QUERY, ConnectionFailure, Event
from .frames import (
    ACK,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    MAX_WINDOW,
    MIN_FRAME_SIZE,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ACK,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    goaway_frame,
    ping_ack,
    rst_frame,
    server_preface,
    settings_values,
    window_frame,
)
from .grpc import (
    CHECK,
    GRPC_INTERNAL,
    GRPC_OK,
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNAVAILABLE,
    PROCESS,
    PROCESS_PATH,
    RULE_KEY,
    WATCH,
    decode_service,
)
from .hpack_replay import BlockDecoder
from .limits import Budget, Limits
from .output import StreamOutput
from .streams import Stream, messages_in

# Frames are parsed ahead of the application by at most this many events: a
# parse costs a set-up, so not one per event, and the output one batch of input
# produces stays near ``Limits.output_high_water`` (checked between parses).
# Order is kept: an END_STREAM is acted on after the messages queued before it.
EVENTS_PER_PARSE = 64
# Small frames (PING and SETTINGS acknowledgements, resets) count too: after this
# many waiting to be written, the adapter writes before more input is parsed.
FRAMES_PER_WRITE = 1024
# Not a wire flag: a HEADERS frame's priority names its own stream (carried with END_STREAM).
SELF_DEPENDENT = 0x100


class Connection(StreamOutput):
    def __init__(
        self,
        limits: Limits,
        budget: Budget,
        now: float,
        *,
        max_message: int,
        metadata_key: bytes = RULE_KEY,
        method_path: bytes = PROCESS_PATH,
        closing_answer: bytes | None = None,
    ) -> None:
        super().__init__(limits, budget, now)
        self.max_message = max_message
        # method_path: the streaming method served (ext_proc's Process for the sampler).
        self.decoder = BlockDecoder(limits.max_header_list_size, limits.hard_header_list_size, metadata_key, method_path)
        # The message a streaming call is answered with when the client ends its
        # input (before the OK trailers); None: none (ext_proc's Process, bidirectional).
        # A client-streaming method's one response, e.g. an empty StreamAccessLogsResponse (b"").
        self.closing_answer = closing_answer
        self.out.append(
            server_preface(limits.max_concurrent_streams, limits.stream_window, limits.max_header_list_size, limits.connection_window)
        )
        self.want_write = False  # input is left, but the output so far must be written first
        self.inbuf = b""
        self.inpos = 0
        self.preface_ok = False
        self.expect_settings = True
        self.highest = 0  # highest client stream id seen: lower unknown ids are closed, higher are idle
        self.skipped: deque[tuple[int, int]] = deque(maxlen=limits.max_skipped_ranges)  # stream ids the peer jumped over
        self.dead = False  # no further input is processed
        self.state = OPEN
        self.errors = 0  # connection errors and limits hit, for the adapter to count
        self.recv_window = limits.connection_window
        self.recv_unacked = 0
        self.peer_initial_window = DEFAULT_WINDOW
        self.cont_sid = 0  # stream whose header block continues in CONTINUATION frames
        self.cont_end = 0
        self.cont_frames = 0
        self.cont_block = bytearray()
        self.settings = TokenBucket(limits.settings_rate, limits.settings_burst, now)
        self.window_opened = False  # the peer granted window: blocked streams are retried once per batch
        self.opened_at = now
        self.last_input = now

    # --- Input ----------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """Bytes read from the peer at ``now``; pull the events with ``next_event``."""
        if self.dead:
            return
        self.now = self.last_input = now
        if self.inpos:
            self.inbuf = self.inbuf[self.inpos :] + data
            self.inpos = 0
        else:
            self.inbuf = self.inbuf + data if self.inbuf else data

    def next_event(self) -> Event | None:
        """The next thing the application must act on, or None: nothing until more
        input (or, with ``want_write``, until the output so far is written)."""
        events = self.events
        while True:
            while events:
                ev = events.popleft()
                kind = ev[0]
                if kind == MESSAGE:
                    if ev[1] in self.streams:  # not ended meanwhile
                        return ev
                elif kind == INPUT_ENDED:
                    st = self.streams.get(ev[1])
                    if st is not None:
                        self._input_ended(st)
                else:
                    return ev
            if (self.dead or not self._parse()) and not events:
                break  # (events left after a connection error: the Closed of its streams)
        if not self.dead and not self.want_write:
            self._end_of_batch()
        return None

    def _parse(self) -> bool:
        """Frames until EVENTS_PER_PARSE events are waiting or the output must be
        written first; whether any frame was read."""
        self.want_write = False
        buf, pos = self.inbuf, self.inpos
        end = len(buf)
        start = pos
        try:
            if not self.preface_ok:
                n = min(end - pos, len(PREFACE))
                if buf[pos : pos + n] != PREFACE[:n]:
                    raise ConnectionFailure(PROTOCOL_ERROR, "invalid connection preface")
                if n < len(PREFACE):
                    return False
                self.preface_ok = True
                pos += len(PREFACE)
                self.inpos = pos
            streams = self.streams
            events = self.events
            limit = self.limits.output_high_water
            out = self.out
            while end - pos >= 9:
                if self.out_bytes >= limit or len(out) >= FRAMES_PER_WRITE:
                    # One read can carry thousands of requests: the adapter writes
                    # what they produced, and stops reading a peer that does not read.
                    self.want_write = True
                    break
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                if length > MIN_FRAME_SIZE:
                    raise ConnectionFailure(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                if end - pos < 9 + length:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                self.inpos = pos
                if self.expect_settings:
                    if ftype != SETTINGS or flags & ACK:
                        raise ConnectionFailure(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
                    self.expect_settings = False
                if self.cont_sid:
                    self._continuation(ftype, flags, sid, payload)
                elif ftype == DATA:
                    st = streams.get(sid)
                    if st is None:
                        self._data_no_stream(sid, flags, payload)
                    else:
                        self._data(st, flags, payload)
                elif ftype == HEADERS:
                    self._headers(flags, sid, payload)
                elif ftype == RST_STREAM:
                    self._rst_stream(sid, payload)
                elif ftype == WINDOW_UPDATE:
                    self._window_update(sid, payload)
                elif ftype == SETTINGS:
                    self._settings(flags, sid, payload)
                elif ftype == PING:
                    if sid:
                        raise ConnectionFailure(PROTOCOL_ERROR, "PING on a stream")
                    if length != 8:
                        raise ConnectionFailure(FRAME_SIZE_ERROR, "PING length is not 8")
                    if not flags & ACK:
                        out.append(ping_ack(payload))
                elif ftype == PRIORITY:
                    self._priority(sid, payload)
                elif ftype == GOAWAY:
                    if sid:
                        raise ConnectionFailure(PROTOCOL_ERROR, "GOAWAY on a stream")
                    if length < 8:
                        raise ConnectionFailure(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                    self.peer_goaway = True
                    if not streams:
                        self.close_when_idle = True
                elif ftype == CONTINUATION:
                    raise ConnectionFailure(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
                elif ftype == PUSH_PROMISE:
                    raise ConnectionFailure(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # Unknown frame types are ignored (section 4.1).
                if len(events) >= EVENTS_PER_PARSE:
                    break
        except ConnectionFailure as e:
            self._fail(e.code, str(e))
            return False
        if pos == end and pos:
            self.inbuf, self.inpos = b"", 0
        return pos != start

    def _end_of_batch(self) -> None:
        # Once per batch of input, not per frame: a flood of tiny WINDOW_UPDATEs
        # must not cost a pass over every blocked stream each.
        if self.window_opened:
            self.window_opened = False
            if self.blocked:
                for st in list(self.blocked.values()):
                    if self.send_window <= 0:
                        break
                    if st.sid in self.streams:
                        self._flush_stream(st)
        if self.recv_unacked >= self.limits.connection_window >> 2:
            self.out.append(window_frame(0, self.recv_unacked))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        if self.close_when_idle and not self.streams and self.state == OPEN:
            self.dead = True
            self.state = CLOSE

    def _data_no_stream(self, sid: int, flags: int, payload: bytes) -> None:
        length = len(payload)
        if sid == 0:
            raise ConnectionFailure(PROTOCOL_ERROR, "DATA on stream 0")
        if sid > self.highest:
            raise ConnectionFailure(PROTOCOL_ERROR, "DATA on an idle stream")
        if flags & PADDED and (not length or payload[0] >= length):
            raise ConnectionFailure(PROTOCOL_ERROR, "padding longer than the frame")
        # Closed stream: its DATA still counts against the connection window
        # (section 6.9), and the peer is told the stream is closed.
        self._consume_connection(length)
        if self.goaway_sid is None or sid <= self.goaway_sid:
            self.out.append(rst_frame(sid, STREAM_CLOSED))

    def _consume_connection(self, length: int) -> None:
        if length > self.recv_window:
            raise ConnectionFailure(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= length
        self.recv_unacked += length

    def _data(self, st: Stream, flags: int, payload: bytes) -> None:
        length = len(payload)
        self._consume_connection(length)
        if flags & PADDED:
            if not length or payload[0] >= length:
                raise ConnectionFailure(PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1 : length - payload[0]]
        if st.remote_closed:
            self._reset(st, STREAM_CLOSED)
            return
        if length > st.recv_window:
            self._reset(st, FLOW_CONTROL_ERROR)
            return
        st.recv_window -= length
        st.recv_unacked += length
        if payload:
            n = len(payload) - 5
            if (
                not st.buf
                and st.kind == PROCESS
                and 0 <= n <= self.max_message
                and not payload[0]
                and int.from_bytes(payload[1:5], "big") == n
            ):
                # Envoy's case, without a call per message: one whole message in one frame.
                st.got_message = True
                self.events.append((MESSAGE, st.sid, payload[5:]))
            else:
                held = len(st.buf)
                problem = messages_in(st, payload, self.max_message, self._message)
                self._partial(len(st.buf) - held)
                if problem is not None:
                    self._finish(st, problem[0], problem[1])
                    return
            if st.buf and (self.partial_bytes > self.limits.max_partial_bytes or self.budget.partial_bytes > self.limits.max_partial_total):
                self._finish(st, GRPC_RESOURCE_EXHAUSTED, "too many partial messages buffered")
                return
        if flags & END_STREAM:
            st.remote_closed = True
            self.events.append((INPUT_ENDED, st.sid, None))
        elif st.recv_unacked >= self.limits.stream_window >> 2:
            self.out.append(window_frame(st.sid, st.recv_unacked))
            st.recv_window += st.recv_unacked
            st.recv_unacked = 0

    def _message(self, st: Stream, msg: bytes) -> tuple[int, str] | None:
        """One complete request message; a status to end the stream with, or None."""
        kind = st.kind
        if kind == PROCESS:
            st.got_message = True
            self.events.append((MESSAGE, st.sid, msg))
            return None
        if st.got_message:
            return (GRPC_INTERNAL, "expected one request message")
        st.got_message = True
        service = decode_service(msg)
        if service is None:
            return (GRPC_INTERNAL, "cannot parse HealthCheckRequest")
        st.service = service
        if kind == WATCH:
            st.announced = True
            self.events.append((WATCH_QUERY, st.sid, service))
        return None

    def _input_ended(self, st: Stream) -> None:
        """The peer's END_STREAM, after every message before it was answered."""
        if st.buf:
            self._finish(st, GRPC_INTERNAL, "the stream ended inside a message")
        elif st.kind == PROCESS:
            if self.closing_answer is not None:
                self._send_message(st, self.closing_answer)
            self._finish(st, GRPC_OK, "")
        elif not st.got_message:
            self._finish(st, GRPC_INTERNAL, "expected one request message")
        elif st.kind == CHECK:
            self.events.append((CHECK_QUERY, st.sid, st.service))
        # WATCH: a half-closed Watch keeps streaming.

    def _continuation(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype != CONTINUATION or sid != self.cont_sid:
            raise ConnectionFailure(PROTOCOL_ERROR, "a header block was interrupted")
        self.cont_block += payload
        self.cont_frames += 1
        if len(self.cont_block) > self.limits.max_header_block or self.cont_frames > self.limits.max_continuation_frames:
            raise ConnectionFailure(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            block = bytes(self.cont_block)
            self.cont_sid = 0
            self.cont_block = bytearray()
            self._header_block(sid, self.cont_end, block)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionFailure(PROTOCOL_ERROR, "HEADERS on stream 0")
        if not sid & 1:
            raise ConnectionFailure(PROTOCOL_ERROR, "HEADERS on a server-initiated (even) stream id")
        if flags & (PADDED | PRIORITY_FLAG):
            start, end = 0, len(payload)
            if flags & PADDED:
                if not end or payload[0] >= end:
                    raise ConnectionFailure(PROTOCOL_ERROR, "padding longer than the frame")
                end -= payload[0]
                start = 1
            if flags & PRIORITY_FLAG:
                if start + 5 > end:
                    raise ConnectionFailure(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
                if int.from_bytes(payload[start : start + 4], "big") & 0x7FFFFFFF == sid:
                    flags |= SELF_DEPENDENT  # section 5.3.1: a stream error, once the block is decoded
                start += 5
            payload = payload[start:end]
        if flags & END_HEADERS:
            self._header_block(sid, flags & (END_STREAM | SELF_DEPENDENT), payload)
        else:
            self.cont_sid = sid
            self.cont_end = flags & (END_STREAM | SELF_DEPENDENT)
            self.cont_frames = 0
            self.cont_block = bytearray(payload)

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        end = flags & END_STREAM
        # Always decode, whatever becomes of the stream: the dynamic table must stay in step.
        try:
            headers = self.decoder.decode(bytes(block))
        except OversizedHeaderListError:
            raise ConnectionFailure(ENHANCE_YOUR_CALM, "header list far beyond SETTINGS_MAX_HEADER_LIST_SIZE") from None
        except HPACKError as e:
            raise ConnectionFailure(COMPRESSION_ERROR, f"HPACK: {e}") from None
        st = self.streams.get(sid)
        if st is not None:
            # A second block: the client's trailers (section 8.1).
            if st.remote_closed:
                self._reset(st, STREAM_CLOSED)
            elif not end or any(k[:1] == b":" for k, _ in headers):
                self._reset(st, PROTOCOL_ERROR)
            else:
                st.remote_closed = True
                self.events.append((INPUT_ENDED, sid, None))
            return
        if sid <= self.highest:
            if any(lo <= sid <= hi for lo, hi in self.skipped):
                raise ConnectionFailure(PROTOCOL_ERROR, "a new stream id lower than an earlier one")
            if any(k[:1] == b":" for k, _ in headers):
                # A request on a stream that was used and closed: never a frame crossing
                # our RST_STREAM (a request is a stream's first frame), so section 5.1's
                # connection error. Trailers may cross; they get a stream error.
                raise ConnectionFailure(STREAM_CLOSED, "a request on a closed stream")
            if self.goaway_sid is None or sid <= self.goaway_sid:
                self.out.append(rst_frame(sid, STREAM_CLOSED))
            return
        if sid > self.highest + 2:
            self.skipped.append((self.highest + 2, sid - 2))
        self.highest = sid
        if self.goaway_sid is not None:
            return  # after GOAWAY, newer streams are ignored; the peer retries them elsewhere
        if flags & SELF_DEPENDENT:
            self.out.append(rst_frame(sid, PROTOCOL_ERROR))
            self._charge_reset()
            return
        if len(self.streams) >= self.limits.max_concurrent_streams or self.pending_bytes > self.limits.output_high_water:
            # Too many streams, or answers already waiting for a window the peer
            # does not grant: no new work for this peer (it may retry the stream).
            self.out.append(rst_frame(sid, REFUSED_STREAM))
            self._charge_reset()
            return
        request = self.decoder.checked(headers)
        if request is None:
            self.out.append(rst_frame(sid, PROTOCOL_ERROR))  # malformed (section 8.1.1)
            self._charge_reset()
            return
        kind, answer, rule, encoding = request
        if answer is not None:
            # A complete answer to a request that is not served; the stream is never opened.
            self.out.append(answer[:5] + sid.to_bytes(4, "big") + answer[9:])
            if not end:
                self.out.append(rst_frame(sid, NO_ERROR))  # stop sending, without error (section 8.1)
            return
        st = Stream(sid, kind, self.peer_initial_window, self.limits.stream_window)
        st.compressed_ok = encoding
        self.streams[sid] = st
        if kind == PROCESS:
            st.announced = True
            self.events.append((REQUEST, sid, rule))
        if end:
            st.remote_closed = True
            self.events.append((INPUT_ENDED, sid, None))

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionFailure(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionFailure(FRAME_SIZE_ERROR, "RST_STREAM length is not 4")
        st = self.streams.get(sid)
        if st is None:
            if sid > self.highest:
                raise ConnectionFailure(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        # Envoy resets every stream once answered; a reset before any request
        # message is what a rapid-reset attack looks like.
        early = not st.got_message
        self._drop(st)
        if early:
            self._charge_reset()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise ConnectionFailure(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionFailure(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self.window_opened = True
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.highest:
                raise ConnectionFailure(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            if not increment:
                self._stream_error(sid, PROTOCOL_ERROR)  # section 6.9, whatever the stream's state
            return  # closed: may cross our RST or END_STREAM (section 5.1)
        if not increment:
            self._reset(st, PROTOCOL_ERROR)
            return
        st.send_window += increment
        if st.send_window > MAX_WINDOW:
            self._reset(st, FLOW_CONTROL_ERROR)
            return
        if st.pending:
            self._flush_stream(st)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ConnectionFailure(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionFailure(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionFailure(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        # A window change touches every open stream: a SETTINGS flood would cost
        # (streams x frames), so SETTINGS frames are rationed like resets.
        if not self.settings.take(self.now):
            raise ConnectionFailure(ENHANCE_YOUR_CALM, "too many SETTINGS frames")
        initial, max_frame = settings_values(payload)
        if max_frame is not None:
            self.peer_max_frame = max_frame
        if initial is None:
            initial = self.peer_initial_window
        delta = initial - self.peer_initial_window
        if delta:
            self.peer_initial_window = initial
            for st in self.streams.values():
                st.send_window += delta
                if st.send_window > MAX_WINDOW:
                    raise ConnectionFailure(FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            if delta > 0:
                self.window_opened = True
        self.out.append(SETTINGS_ACK)

    def _priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionFailure(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, FRAME_SIZE_ERROR)
        elif int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
            self._stream_error(sid, PROTOCOL_ERROR)  # a stream cannot depend on itself (section 5.3.1)
        # Otherwise ignored (section 5.3.2 deprecates the scheme), on any stream state.

    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM ``code`` on ``sid``, open or not; rationed like every reset we are made to send."""
        st = self.streams.get(sid)
        if st is not None:
            self._reset(st, code)
        else:
            self.out.append(rst_frame(sid, code))
            self._charge_reset()

    def drain(self) -> None:
        """Graceful stop: GOAWAY so the peer opens nothing new, end Watch streams,
        close once the remaining streams end."""
        if self.dead:
            return
        if self.goaway_sid is None:
            self.goaway_sid = self.highest
            self.out.append(goaway_frame(self.highest, NO_ERROR))
        for st in [st for st in self.streams.values() if st.kind == WATCH]:
            self._finish(st, GRPC_UNAVAILABLE, "server shutting down")
        self.close_when_idle = True
        if not self.streams:
            self.dead = True
            self.state = CLOSE

    def tick(self, now: float) -> None:
        """The clock: a connection that never completed its preface is dropped,
        one idle (no input, no stream) for too long is drained."""
        if self.dead:
            return
        if (not self.preface_ok or self.expect_settings) and now - self.opened_at > self.limits.preface_timeout:
            self.errors += 1
            self.dead = True
            self.state = ABORT
            self._drop_all()
        elif not self.streams and now - self.last_input > self.limits.idle_timeout:
            self.drain()  # GOAWAY NO_ERROR: a healthy peer simply reconnects

    def written(self, unsent: int) -> None:
        """The adapter wrote ``data_to_send()``; ``unsent`` bytes of all written so far
        are still waiting in its buffer. Checks what this peer makes us hold."""
        queued = unsent + self.pending_bytes
        budget = self.budget
        budget.queued_bytes += queued - self.queued
        self.queued = queued
        if self.dead:
            return
        limits = self.limits
        if queued > limits.max_queued_output or (budget.queued_bytes > limits.max_queued_total and queued > limits.output_high_water):
            self._fail(ENHANCE_YOUR_CALM, "output not read")

    def internal_error(self, what: str) -> None:
        """A bug or an unforeseen input (in the adapter or here) costs this connection only."""
        self._fail(INTERNAL_ERROR, f"internal error: {what}")

    def lost(self) -> None:
        """The socket is gone: forget everything, give back the budget."""
        self.dead = True
        self._drop_all()
        self.inbuf, self.inpos = b"", 0
        self.budget.queued_bytes -= self.queued
        self.queued = 0

    def _drop_all(self) -> None:
        for st in list(self.streams.values()):
            self._drop(st)

    def _fail(self, code: int, message: str) -> None:
        """Connection error: GOAWAY, forget every stream; the adapter lets the peer read it, then closes."""
        if self.dead and self.state != OPEN:
            return
        self.dead = True
        self.state = FAIL
        self.errors += 1
        self.inbuf, self.inpos = b"", 0
        self.cont_block = bytearray()
        self._drop_all()
        last = self.highest if self.goaway_sid is None else min(self.goaway_sid, self.highest)
        self.goaway_sid = last
        self.out.append(goaway_frame(last, code, message.encode()[:256]))

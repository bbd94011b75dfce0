"""One HTTP/2 stream's state and the gRPC message framing inside its DATA (pure)."""

from __future__ import annotations

from collections.abc import Callable

from .frames import with_sid
from .grpc import GRPC_INTERNAL, GRPC_OK, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, TRAILERS_OK, status_frame


class Stream:
    __slots__ = (
        "sid",
        "kind",
        "announced",
        "buf",
        "headers_sent",
        "remote_closed",
        "got_message",
        "compressed_ok",
        "send_window",
        "recv_window",
        "recv_unacked",
        "pending",
        "trailer",
        "service",
        "sent_status",
    )

    def __init__(self, sid: int, kind: int, send_window: int, recv_window: int) -> None:
        self.sid = sid
        self.kind = kind
        self.announced = False  # the application was told of it (Request, Watch): it is told when it goes
        self.buf: bytes | bytearray = b""  # a partial gRPC message
        self.headers_sent = False
        self.remote_closed = False  # END_STREAM received: half-closed (remote)
        self.got_message = False
        self.compressed_ok = False  # the client named a grpc-encoding (so a compressed message is UNIMPLEMENTED, not INTERNAL)
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.pending = bytearray()  # DATA payload waiting for flow-control window
        self.trailer: bytes | None = None  # trailers to send once ``pending`` drains
        self.service = ""
        self.sent_status = -1

    def trailers(self, status: int, message: str) -> bytes:
        """The frame that ends this stream with ``status``: trailers, or a trailers-only response."""
        if self.headers_sent and status == GRPC_OK:
            return with_sid(TRAILERS_OK, self.sid)
        return with_sid(status_frame(status, message, self.headers_sent), self.sid)


def messages_in(
    st: Stream, payload: bytes, max_message: int, on_message: Callable[[Stream, bytes], tuple[int, str] | None]
) -> tuple[int, str] | None:
    """Split DATA into gRPC messages (length-prefixed, gRPC over HTTP/2), keeping a
    partial one in ``st.buf``; ``on_message`` gets each whole one. A status to end
    the stream with (the first problem), or None."""
    if st.buf:
        st.buf += payload  # a bytearray: partial messages grow without copying
        data: bytes | bytearray = st.buf
    else:
        data = payload
    pos, end = 0, len(data)
    while end - pos >= 5:
        flag = data[pos]
        n = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if flag:
            # Compressed (or an undefined flag). A compressed message without a
            # grpc-encoding is INTERNAL; with one we do not implement, UNIMPLEMENTED.
            if flag == 1 and st.compressed_ok:
                return (GRPC_UNIMPLEMENTED, "compressed messages are not supported")
            return (GRPC_INTERNAL, "compressed flag set without a supported grpc-encoding")
        if n > max_message:
            return (GRPC_RESOURCE_EXHAUSTED, f"message larger than {max_message} bytes")
        if end - pos - 5 < n:
            break
        msg = bytes(data[pos + 5 : pos + 5 + n])
        pos += 5 + n
        problem = on_message(st, msg)
        if problem is not None:
            return problem
    if pos == end:
        st.buf = b""
    elif isinstance(data, bytearray):
        del data[:pos]
    else:
        st.buf = bytearray(data[pos:])
    return None

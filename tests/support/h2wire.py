"""HTTP/2 as a test client writes and reads it: frame builders that can send
anything (the hostile tests need frames no library would send), and a frame
reader with an HPACK decoder, shared by the in-memory peer (tests/unit) and
the socket peer (tests/service). Pure."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import hpack

from extproc.wire import PROCESS_METHOD

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 0xB


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


def rst_code(code: int) -> bytes:
    return code.to_bytes(4, "big")


def grpc_frame(msg: bytes, compressed: int = 0) -> bytes:
    return bytes([compressed]) + len(msg).to_bytes(4, "big") + msg


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


class PeerBase:
    """A client side of HTTP/2: what it sends (``send`` is the subclass's) and
    the frames it has read, in order (``_more`` brings bytes; b"" at the end)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.eof = False
        self.frames: list[Frame] = []  # everything read so far, in order

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def _more(self, timeout: float) -> bytes:
        """Bytes from the server, b"" when it closed (or, in memory, has nothing more)."""
        raise NotImplementedError

    def handshake(self, *settings: tuple[int, int]) -> None:
        self.send(PREFACE + settings_frame(*settings))

    def block(self, headers: list[tuple[str, str]]) -> bytes:
        return self.encoder.encode(headers)

    def open(self, sid: int, path: str = PROCESS_METHOD, *, end: bool = False, extra: list[tuple[str, str]] | None = None) -> None:
        block = self.block(request_headers(path, extra))
        self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block))

    def data(self, sid: int, payload: bytes, *, end: bool = False) -> None:
        self.send(frame(DATA, END_STREAM if end else 0, sid, payload))

    def _read_frame(self, timeout: float) -> Frame | None:
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
            chunk = self._more(timeout)
            if not chunk:
                self.eof = True
            self.buf += chunk

    def read_until(self, predicate: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        while True:
            f = self._read_frame(timeout)
            if f is None:
                raise EOFError(f"no such frame; last frames: {[(x.type, x.flags, x.sid) for x in self.frames][-10:]}")
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

    def headers(self, sid: int, timeout: float = 5.0) -> tuple[dict[str, str], int]:
        """The next header block on ``sid``, decoded (keeps the HPACK decoder in step), and its flags."""
        f = self.read_until(lambda f: f.type == HEADERS and f.sid == sid, timeout)
        return self._decode(f.payload), f.flags

    def _decode(self, block: bytes) -> dict[str, str]:
        return dict(cast(list[tuple[str, str]], self.decoder.decode(block)))

    def response(self, sid: int, timeout: float = 5.0) -> tuple[list[bytes], dict[str, str]]:
        """Every gRPC message on ``sid`` up to its trailers; (messages, trailers)."""
        body = b""
        trailers: dict[str, str] = {}
        while True:
            f = self.read_until(lambda f: f.sid == sid and f.type in (HEADERS, DATA, RST_STREAM), timeout)
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

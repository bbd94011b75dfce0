"""What the HTTP/2 protocol asks of the application (events), and the
connection error it raises internally. Plain data.

An event is a tuple ``(kind, stream id, value)``: tuples, not classes, because
the hot path makes three per request (a class with ``__init__`` costs a
Python call each)."""

from __future__ import annotations

from typing import Any

REQUEST = 0
"""A Process stream was opened (value: its metadata value named by the connection's key, for the
sampler the rule id, or None): the application opens its processor."""
MESSAGE = 1
"""A request message on a Process stream (value: bytes): the application may ``send_message``."""
CHECK_QUERY = 2
"""A Health Check (value: the service): answer once with ``health``."""
WATCH_QUERY = 3
"""A Health Watch (value: the service): answer with ``health`` now and on every change."""
CLOSED = 4
"""A stream announced by REQUEST or WATCH_QUERY is gone, however it ended (value: None)."""
INPUT_ENDED = 5
"""Internal, never returned: the peer's END_STREAM, acted on once the messages before it are answered."""

Event = tuple[int, int, Any]  # the value's type depends on the kind (above)


class ConnectionFailure(Exception):
    """A connection error (section 5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# What the adapter does with the socket once the output is written: keep it,
# close it, half-close it after a GOAWAY (so the peer reads it) then drop it,
# or drop it at once.
OPEN, CLOSE, FAIL, ABORT = range(4)

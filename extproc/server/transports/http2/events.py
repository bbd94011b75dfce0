"""What the HTTP/2 protocol asks of the application (events), and the
connection error it raises internally. Plain data."""

from __future__ import annotations


class Request:
    """A Process stream was opened: the application opens its processor."""

    __slots__ = ("sid", "rule")

    def __init__(self, sid: int, rule: str | None) -> None:
        self.sid = sid
        self.rule = rule


class Message:
    """A request message on a Process stream: the application may ``send_message``."""

    __slots__ = ("sid", "data")

    def __init__(self, sid: int, data: bytes) -> None:
        self.sid = sid
        self.data = data


class HealthQuery:
    """A Health Check (answer once with ``health``) or Watch (answer now and on every change)."""

    __slots__ = ("sid", "service", "watch")

    def __init__(self, sid: int, service: str, watch: bool) -> None:
        self.sid = sid
        self.service = service
        self.watch = watch


class Closed:
    """A stream announced by Request or a Watch is gone, however it ended."""

    __slots__ = ("sid",)

    def __init__(self, sid: int) -> None:
        self.sid = sid


Event = Request | Message | HealthQuery | Closed


class InputEnded:
    """Internal: the peer's END_STREAM, acted on once the messages before it are answered."""

    __slots__ = ("sid",)

    def __init__(self, sid: int) -> None:
        self.sid = sid


class ConnectionFailure(Exception):
    """A connection error (section 5.4.1): GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# What the adapter does with the socket once the output is written.
OPEN, CLOSE, FAIL, ABORT = range(4)


# What the adapter does with the socket once the output is written: keep it,
# close it, half-close it after a GOAWAY (so the peer reads it) then drop it,
# or drop it at once.
OPEN, CLOSE, FAIL, ABORT = range(4)

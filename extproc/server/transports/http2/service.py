"""The application behind the HTTP/2 protocol: the protocol's events turned into
servicer and health calls, and their answers given back (no I/O of its own;
the servicer is whatever it is)."""

from __future__ import annotations

from typing import Final, Protocol

from extproc.server.health import SERVICE_UNKNOWN, Health

from .events import CLOSED, MESSAGE, REQUEST, WATCH_QUERY
from .grpc import GRPC_INTERNAL, GRPC_OK
from .protocol import Connection


class Finished(bytes):
    """The type of ``FINISHED``."""


FINISHED: Final = Finished()
"""What ``message`` returns to end its stream at once with OK (the peer is told
to send no more): an observer that has seen all it wants. Told apart by identity."""


class ProcessStreamLike(Protocol):
    def message(self, data: bytes) -> bytes | None:
        """The answer to one request message, None for none, or ``FINISHED``."""
        ...

    def close(self) -> None: ...


class ServicerLike(Protocol):
    def open_stream(self, metadata: str | None, /) -> ProcessStreamLike:
        """A new stream; ``metadata``: the value of the transport's metadata key
        (the sampler's: the rule id its route set), None when absent."""
        ...


class StreamService:
    """One connection's streams as the servicer sees them."""

    __slots__ = ("servicer", "health", "procs", "watches")

    def __init__(self, servicer: ServicerLike, health: Health) -> None:
        self.servicer = servicer
        self.health = health
        self.procs: dict[int, ProcessStreamLike] = {}
        self.watches: dict[int, str] = {}  # Watch streams: the service each watches

    def serve(self, conn: Connection) -> None:
        """Act on every event the protocol has ready (until it needs input or a write)."""
        procs = self.procs
        ev = conn.next_event()
        while ev is not None:
            kind, sid, value = ev
            if kind == MESSAGE:
                proc = procs.get(sid)
                if proc is not None:
                    try:
                        answer = proc.message(value)
                    except Exception:
                        # The servicer's failure ends this stream, not the connection.
                        conn.end_stream(sid, GRPC_INTERNAL, "the processor failed")
                    else:
                        if answer is not None:
                            if answer is FINISHED:
                                conn.end_stream(sid, GRPC_OK, "")
                            else:
                                conn.send_message(sid, answer)
            elif kind == REQUEST:
                try:
                    procs[sid] = self.servicer.open_stream(value)
                except Exception:
                    conn.end_stream(sid, GRPC_INTERNAL, "the processor failed")
            elif kind == CLOSED:
                proc = procs.pop(sid, None)
                if proc is not None:
                    self._close(proc)
                else:
                    self.watches.pop(sid, None)
            else:
                status = self.health.status(value)
                if kind == WATCH_QUERY:
                    self.watches[sid] = value
                    conn.health(sid, SERVICE_UNKNOWN if status is None else status)
                else:
                    conn.health(sid, status)
            ev = conn.next_event()

    def push_health(self, conn: Connection) -> None:
        """The serving status changed: every Watch stream hears of it (if it changed for its service)."""
        for sid, service in list(self.watches.items()):
            status = self.health.status(service)
            conn.health(sid, SERVICE_UNKNOWN if status is None else status)

    def close_all(self) -> None:
        """The connection is gone: every processor is closed."""
        for proc in self.procs.values():
            self._close(proc)
        self.procs.clear()
        self.watches.clear()

    @staticmethod
    def _close(proc: ProcessStreamLike) -> None:
        # The stream is gone either way; the servicer counts its own errors.
        # (Not contextlib.suppress: that is two more Python calls per stream.)
        try:  # noqa: SIM105
            proc.close()
        except Exception:
            pass

"""The ExternalProcessor service, independent of the transport.

Envoy opens one bidirectional ``Process`` stream per HTTP request. A
transport (``transports.grpcio`` or ``transports.http2``) calls
``Servicer.open_stream`` when a stream starts, ``ProcessStream.message`` for
each serialised ``ProcessingRequest`` and ``ProcessStream.close`` once when it
ends, however it ends. The stream takes one policy snapshot when it starts,
so a reload in the middle never splits a request between two policies.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError

from ..core.headers import header_map
from ..core.plan import Plan
from ..core.responses import CONTINUE
from ..wire import ProcessingRequest
from .metrics import ErrorKind, Metrics


class ProcessStream:
    """One ext_proc stream: messages in, answers out."""

    __slots__ = ("plan", "responder", "rule_id", "metrics")

    def __init__(self, plan: Plan, rule_id: str | None, metrics: Metrics) -> None:
        self.plan = plan
        self.responder = plan.responder
        self.rule_id = rule_id
        self.metrics = metrics

    def message(self, data: bytes) -> bytes | None:
        """One serialised ProcessingRequest in; the serialised answer, or None
        when there is nothing to answer."""
        try:
            request = ProcessingRequest.FromString(data)
        except DecodeError:
            # Not Envoy: no answer can be of the right kind. Counted here; the
            # transport ends the stream with INTERNAL (both transports alike).
            self.metrics.error(ErrorKind.MALFORMED_MESSAGE)
            raise
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            try:
                headers, repeated = header_map(
                    # Envoy sends values in raw_value; value is read too so a
                    # client that fills only the string field still works.
                    (h.key, h.raw_value or h.value.encode("utf-8", "surrogateescape"))
                    for h in request.request_headers.headers.headers
                )
                return self.plan.answer(headers, repeated, self.rule_id)
            except Exception:
                # Never break Envoy's stream over one request: answer "no
                # mirror" (the safe side) and count the error.
                self.metrics.error(ErrorKind.DECISION)
                return self.responder.response((), rematch=True)
        answer = CONTINUE.get(kind or "")
        if answer is None:
            # A message kind this contract does not know: nothing sensible to
            # answer, and Envoy only sends what its processing mode asks for.
            self.metrics.error(ErrorKind.UNKNOWN_MESSAGE)
        return answer

    def close(self) -> None:
        self.metrics.streams_done.inc()


class Servicer:
    """Opens streams against the policy in force (``current``: the store's
    compiled plan, swapped whole on reload)."""

    def __init__(self, current: Callable[[], Plan], metrics: Metrics) -> None:
        self._current = current
        self._metrics = metrics

    def open_stream(self, rule_id: str | None) -> ProcessStream:
        self._metrics.streams.inc()
        return ProcessStream(self._current(), rule_id, self._metrics)

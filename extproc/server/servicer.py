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

from ..core.headers import header_map
from ..core.plan import Plan
from ..core.responses import CONTINUE, Responder
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
        request = ProcessingRequest.FromString(data)
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
    """Opens streams against the policy in force (``current``, swapped on reload)."""

    def __init__(self, current: Callable[[], Responder], metrics: Metrics) -> None:
        self._current = current
        self._metrics = metrics
        self._plan: Plan | None = None
        # Compiled now, so every rule's decision series exist (at 0) from the start.
        self.plan()

    def plan(self) -> Plan:
        """The compiled plan for the policy in force; rebuilt once per reload."""
        responder = self._current()
        plan = self._plan
        if plan is None or plan.responder is not responder:
            plan = self._plan = Plan(responder, self._metrics)
        return plan

    def open_stream(self, rule_id: str | None) -> ProcessStream:
        self._metrics.streams.inc()
        return ProcessStream(self.plan(), rule_id, self._metrics)

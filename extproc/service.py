"""The ExternalProcessor servicer: request headers in, slot-header mutation out.

Envoy opens one bidirectional stream per HTTP request. The stream takes one
policy snapshot when it starts, so a reload in the middle never splits a
request between two policies.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

import grpc

from .keys import Headers
from .metrics import Metrics
from .policy import Policy
from .wire import (
    PROCESS_METHOD,
    SERVICE_NAME,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HeaderValue,
    HeaderValueOption,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)

# For message kinds the sampler has no business with (a user's processing mode
# may send them anyway): the matching empty CONTINUE, serialised once.
_CONTINUE = {
    "response_headers": ProcessingResponse(response_headers=HeadersResponse()).SerializeToString(),
    "request_body": ProcessingResponse(request_body=BodyResponse()).SerializeToString(),
    "response_body": ProcessingResponse(response_body=BodyResponse()).SerializeToString(),
    "request_trailers": ProcessingResponse(request_trailers=TrailersResponse()).SerializeToString(),
    "response_trailers": ProcessingResponse(response_trailers=TrailersResponse()).SerializeToString(),
}


def header_map(message: HttpHeaders) -> dict[str, bytes]:
    """Lower-cased name -> raw bytes of its first value; cookies joined.

    Envoy sends values in ``raw_value``; ``value`` is read too so a client
    that fills only the string field still works.
    """
    out: dict[str, bytes] = {}
    for h in message.headers.headers:
        name = h.key.lower()
        value = h.raw_value or h.value.encode("utf-8", "surrogateescape")
        if name not in out:
            out[name] = value
        elif name == "cookie":
            out[name] += b"; " + value
    return out


class Responder:
    """Serialised header responses for one policy, built once per sampled set."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[tuple[tuple[int, str], ...], bool], bytes] = {}

    def response(self, sampled: tuple[tuple[int, str], ...], rematch: bool = False) -> bytes:
        """``rematch``: the request arrived carrying a slot header, so the route
        Envoy picked may be a mirror variant selected by a forged value."""
        key = (sampled, rematch or bool(sampled))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(*key)
        return cached

    def _build(self, sampled: tuple[tuple[int, str], ...], clear_route_cache: bool) -> bytes:
        policy = self.policy
        set_slots = {slot for slot, _ in sampled}
        mutation = HeaderMutation(
            set_headers=[
                # append unset means overwrite: a forged value is replaced, not joined.
                HeaderValueOption(header=HeaderValue(key=policy.slot_names[slot], raw_value=cluster.encode()))
                for slot, cluster in sampled
            ],
            # Every slot header the sampler did not set goes, whoever sent it;
            # so does a client-supplied marker header.
            remove_headers=[n for i, n in enumerate(policy.slot_names) if i not in set_slots] + [policy.marker_header],
        )
        # Envoy re-matches only when told to: after setting a slot header (to
        # select the mirror variant) and after removing one a client sent (to
        # leave the variant it selected).
        common = CommonResponse(header_mutation=mutation, clear_route_cache=clear_route_cache)
        return ProcessingResponse(request_headers=HeadersResponse(response=common)).SerializeToString()


class ExternalProcessor:
    def __init__(self, policy: Callable[[], Responder], metrics: Metrics) -> None:
        self._responder = policy
        self._metrics = metrics

    def decide(self, responder: Responder, headers: Headers) -> bytes:
        decision = responder.policy.decide(headers)
        if decision.rule is not None:
            count = self._metrics.decision
            for t in decision.targets:
                count(decision.rule.id, t.target.backend, t.outcome.value)
        policy = responder.policy
        forged = any(name in headers for name in policy.slot_names)
        return responder.response(tuple((t.slot, t.backend) for t in decision.sampled), forged)

    async def process(self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        responder = self._responder()
        metrics = self._metrics
        metrics.streams.inc()
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    try:
                        yield self.decide(responder, header_map(request.request_headers))
                    except Exception:
                        # Never break Envoy's stream over one request: answer
                        # "no mirror" (the safe side) and count the error.
                        metrics.errors.labels("decision").inc()
                        yield responder.response((), rematch=True)
                elif kind in _CONTINUE:
                    yield _CONTINUE[kind]
                else:
                    # A message kind this contract does not know: nothing
                    # sensible to answer, and Envoy only sends what its
                    # processing mode asks for.
                    metrics.errors.labels("unknown_message").inc()
        finally:
            metrics.streams_done.inc()


def generic_handler(processor: ExternalProcessor) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            PROCESS_METHOD.rsplit("/", 1)[1]: grpc.stream_stream_rpc_method_handler(
                processor.process,
                request_deserializer=ProcessingRequest.FromString,
                # Responses are pre-serialised bytes.
                response_serializer=lambda b: b,
            )
        },
    )

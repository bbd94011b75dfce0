"""The ExternalProcessor servicer: request headers in, slot-header mutation out.

Envoy opens one bidirectional stream per HTTP request. The stream takes one
policy snapshot when it starts, so a reload in the middle never splits a
request between two policies.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable

import grpc

from .keys import Headers, KeyKind, extract_key
from .matching import PathType, Repeated, RequestView
from .metrics import Metrics
from .policy import Policy, Rule
from .sampling import key_hash
from .wire import (
    PROCESS_METHOD,
    RULE_METADATA,
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


def header_map(message: HttpHeaders) -> tuple[dict[str, bytes], dict[str, list[bytes]] | None]:
    """Lower-cased name -> raw bytes of its first value (cookies joined, for
    keys), and every value of the names that came more than once (for
    matching, where any value counts; None when there are none, the usual case).

    Envoy sends values in ``raw_value``; ``value`` is read too so a client
    that fills only the string field still works.
    """
    out: dict[str, bytes] = {}
    repeated: dict[str, list[bytes]] | None = None
    for h in message.headers.headers:
        name = h.key.lower()
        value = h.raw_value or h.value.encode("utf-8", "surrogateescape")
        if name not in out:
            out[name] = value
            continue
        if repeated is None:
            repeated = {}
        values = repeated.get(name)
        if values is None:
            values = repeated[name] = [out[name]]
        values.append(value)
        if name == "cookie":
            out[name] += b"; " + value
    return out, repeated


class Responder:
    """Serialised header responses for one policy, built once per sampled set."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # Policy.slot_names builds a tuple per call; the hot path reads it per request.
        self.slot_names = policy.slot_names
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


class RateCap:
    """At most ``rate`` mirrors a second to one target, in this process (a
    token bucket holding one second's worth). Unlike the fraction, which
    keys are cut is not consistent: it depends on arrival order."""

    __slots__ = ("rate", "capacity", "tokens", "last", "clock")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


class RulePlan:
    """One rule's decision, compiled: targets as (threshold, slot, backend) and
    the prepared response and metric increments for every possible outcome.

    Targets share one ``u`` (one salt per policy), so the sampled set is fixed
    by how many thresholds ``u`` is below, in threshold order: at most
    len(mirrors) + 1 distinct answers, each prepared once.
    """

    __slots__ = ("rule", "targets", "no_key", "methods", "wrong_method", "disabled")

    def __init__(self, rule: Rule, metrics: Metrics) -> None:
        self.rule = rule
        # For each target: threshold, and per outcome (sampled or not) the
        # counter increment; evaluated in the rule's own target order.
        self.targets = tuple(
            (
                t.threshold,
                (t.slot, t.backend),
                metrics.decision_counter(rule.id, t.backend, "mirrored"),
                metrics.decision_counter(rule.id, t.backend, "skipped"),
                None if rule.max_mirrors_per_second is None else RateCap(rule.max_mirrors_per_second),
                metrics.decision_counter(rule.id, t.backend, "capped"),
            )
            for t in rule.mirrors
        )
        self.no_key = tuple(metrics.decision_counter(rule.id, t.backend, "no_key") for t in rule.mirrors)
        self.methods = frozenset(m.encode() for m in rule.methods)
        self.wrong_method = tuple(metrics.decision_counter(rule.id, t.backend, "method") for t in rule.mirrors)
        self.disabled = tuple(metrics.decision_counter(rule.id, t.backend, "disabled") for t in rule.mirrors)


class Plan:
    """A policy compiled for the hot path: the same decision as
    ``Policy.decide`` (tests compare the two), with no per-request
    configuration work, allocation beyond the header map, or label lookups.
    """

    def __init__(self, responder: Responder, metrics: Metrics) -> None:
        policy = responder.policy
        self.responder = responder
        self.policy = policy
        self.slot_names = responder.slot_names
        self.rules: dict[int, RulePlan] = {id(r): RulePlan(r, metrics) for r in policy.rules if r.mirrors}
        # The common shape (simple mode, or one catch-all rule for every
        # host): every request matches the same rule, no matching needed.
        self.only: RulePlan | None = None
        self.catch_all = False
        vhosts = policy.table.vhosts
        if len(vhosts) == 1 and vhosts[0][0] == "" and vhosts[0][1]:
            m = vhosts[0][1][0].match
            if m.path.type is PathType.PREFIX and m.path.prefix == "/" and not m.headers and not m.query_params and m.method is None:
                self.catch_all = True
                self.only = self.rules.get(id(vhosts[0][1][0].rule))
        # Header-only key chains (the default) skip the generic extractor.
        chain = policy.key_chain
        # (host is the exception: ext_proc carries it as :authority.)
        plain = all(s.kind is KeyKind.HEADER and s.name != "host" for s in chain)
        self.header_keys: tuple[str, ...] | None = tuple(s.name for s in chain) if plain else None
        self.salt = policy.salt
        self.enabled = policy.enabled
        self.by_id: dict[str, RulePlan | None] = {r.id: self.rules.get(id(r)) for r in policy.rules}

    def rule_plan(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> RulePlan | None:
        """The rule Envoy matched when it says so (gRPC metadata set by the
        generated routes), else the sampler's own matching."""
        if rule_id is not None and rule_id in self.by_id:
            return self.by_id[rule_id]
        if self.catch_all:
            return self.only
        entry = self.policy.table.lookup(RequestView(headers, repeated))
        return None if entry is None else self.rules.get(id(entry.rule))

    def key(self, headers: Headers) -> bytes | None:
        names = self.header_keys
        if names is not None:
            for name in names:
                value = headers.get(name)
                if value:
                    return value
            return None
        found = extract_key(self.policy.key_chain, headers)
        return None if found is None else found[1]

    def sampled(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> tuple[tuple[int, str], ...]:
        """The (slot, backend) pairs this request is mirrored to; counts the decision."""
        plan = self.rule_plan(headers, repeated, rule_id)
        if plan is None:
            return ()
        if not self.enabled:
            for inc in plan.disabled:
                inc()
            return ()
        if plan.methods and headers.get(":method", b"GET") not in plan.methods:
            for inc in plan.wrong_method:
                inc()
            return ()
        key = self.key(headers)
        if key is None:
            for inc in plan.no_key:
                inc()
            return ()
        u = key_hash(self.salt, key)
        sampled = []
        for threshold, pair, mirrored, skipped, cap, capped in plan.targets:
            if u >= threshold:
                skipped()
            elif cap is None or cap.take():
                mirrored()
                sampled.append(pair)
            else:
                capped()
        return tuple(sampled)

    def answer(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> bytes:
        sampled = self.sampled(headers, repeated, rule_id)
        forged = False
        for name in self.slot_names:
            if name in headers:
                forged = True
                break
        return self.responder.response(sampled, forged)


class ExternalProcessor:
    def __init__(self, policy: Callable[[], Responder], metrics: Metrics) -> None:
        self._responder = policy
        self._metrics = metrics
        self._plan: Plan | None = None

    def plan(self, responder: Responder) -> Plan:
        """The compiled plan for this responder; rebuilt once per reload."""
        plan = self._plan
        if plan is None or plan.responder is not responder:
            plan = self._plan = Plan(responder, self._metrics)
        return plan

    def decide(self, responder: Responder, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> bytes:
        return self.plan(responder).answer(headers, repeated, rule_id)

    async def process(self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        responder = self._responder()
        plan = self.plan(responder)
        metrics = self._metrics
        rule_id = _rule_id(context)
        metrics.streams.inc()
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    try:
                        headers, repeated = header_map(request.request_headers)
                        answer = plan.answer(headers, repeated, rule_id)
                    except Exception:
                        # Never break Envoy's stream over one request: answer
                        # "no mirror" (the safe side) and count the error.
                        metrics.errors.labels("decision").inc()
                        answer = responder.response((), rematch=True)
                    yield answer
                elif kind in _CONTINUE:
                    yield _CONTINUE[kind]
                else:
                    # A message kind this contract does not know: nothing
                    # sensible to answer, and Envoy only sends what its
                    # processing mode asks for.
                    metrics.errors.labels("unknown_message").inc()
        finally:
            metrics.streams_done.inc()


def _rule_id(context: grpc.aio.ServicerContext) -> str | None:
    """The rule id Envoy's route put on this stream (RULE_METADATA), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == RULE_METADATA:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


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

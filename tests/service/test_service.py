"""The servicer over a real gRPC channel: what Envoy would send, what it gets back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.plan import Plan
from extproc.core.policy import Outcome
from extproc.core.sampling import Fraction, decide
from extproc.server.metrics import Metrics
from extproc.wire import (
    PROCESS_METHOD,
    HeaderMap,
    HeaderValue,
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
)
from tests.support.decision import reference_outcomes, reference_rule
from tests.support.inprocess import servicer_for, serving
from tests.support.paths import CONFORMANCE

SLOTS = ("x-mirror-cluster-0", "x-mirror-cluster-1")


def headers_request(headers: dict[str, bytes]) -> ProcessingRequest:
    return ProcessingRequest(
        request_headers=HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in headers.items()]))
    )


def run_with_processor(
    transport: str, policy_env: dict[str, str], manifest: str | None, body: Callable[[grpc.aio.Channel, Metrics], Awaitable[Any]]
) -> Any:
    async def main() -> Any:
        settings = Settings.load(policy_env)
        policy = build_policy(settings, manifest)
        metrics = Metrics()
        async with serving(servicer_for(policy, metrics), transport) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(channel, metrics)

    return asyncio.run(main())


def process_call(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(
        PROCESS_METHOD,
        request_serializer=ProcessingRequest.SerializeToString,
        response_deserializer=ProcessingResponse.FromString,
    )()


async def exchange(channel: grpc.aio.Channel, *requests: ProcessingRequest) -> list[ProcessingResponse]:
    call = process_call(channel)
    out = []
    for r in requests:
        await call.write(r)
        out.append(await call.read())
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return out


def mutation(resp: ProcessingResponse) -> tuple[dict[str, bytes], list[str], bool]:
    assert resp.WhichOneof("response") == "request_headers"
    common = resp.request_headers.response
    assert common.status == 0  # CONTINUE
    sets = {o.header.key: o.header.raw_value for o in common.header_mutation.set_headers}
    for o in common.header_mutation.set_headers:
        # Envoy: value would arrive empty, both set is an error; append unset = overwrite.
        assert o.header.value == ""
        assert not o.HasField("append")
    return sets, list(common.header_mutation.remove_headers), common.clear_route_cache


SIMPLE = {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "42"}


def test_sampled_request_gets_slot_header_and_others_removed(transport: str) -> None:
    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        (resp,) = await exchange(channel, headers_request({":path": b"/", "x-request-id": b"alice"}))
        sets, removes, clear = mutation(resp)
        assert sets == {"x-mirror-cluster-0": b"shadow"}
        assert "x-mirror-cluster-1" in removes and "x-mirror-cluster-0" not in removes
        assert "x-mirror-rule" in removes
        assert clear is True

    run_with_processor(transport, SIMPLE, None, body)


def test_unsampled_request_removes_every_slot_header_including_forged_ones(transport: str) -> None:
    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        forged = {":path": b"/", "x-request-id": b"user-123", "X-Mirror-Cluster-0": b"shadow", "x-mirror-cluster-1": b"evil"}
        (resp,) = await exchange(channel, headers_request(forged))
        sets, removes, clear = mutation(resp)
        assert sets == {}
        assert set(SLOTS) <= set(removes)
        # Envoy may have picked a mirror variant route with the forged header.
        assert clear is True
        (clean,) = await exchange(channel, headers_request({":path": b"/", "x-request-id": b"user-123"}))
        assert mutation(clean)[2] is False

    run_with_processor(transport, SIMPLE, None, body)


def test_no_key_is_not_mirrored_and_counted(transport: str) -> None:
    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        (resp,) = await exchange(channel, headers_request({":path": b"/", "x-request-id": b""}))
        sets, removes, _ = mutation(resp)
        assert sets == {} and set(SLOTS) <= set(removes)
        assert (
            metrics.registry.get_sample_value("mirror_sampler_decisions_total", {"rule": "simple", "target": "shadow", "outcome": "no_key"})
            == 1
        )

    run_with_processor(transport, SIMPLE, None, body)


def test_decisions_over_the_wire_equal_the_decision_function(transport: str) -> None:
    keys = [f"user-{i}".encode() for i in range(300)]
    with open(CONFORMANCE) as f:
        manifest = f.read()

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        for key in keys:
            (resp,) = await exchange(
                channel, headers_request({":path": b"/percent-multi-mirror-and-modify-headers/x", ":authority": b"h", "x-request-id": key})
            )
            sets, removes, clear = mutation(resp)
            expected = {}
            if decide(b"", key, Fraction(35)):
                expected["x-mirror-cluster-0"] = b"infra-backend-v2"
            if decide(b"", key, Fraction(50)):
                expected["x-mirror-cluster-1"] = b"infra-backend-v3"
            assert sets == expected, key
            assert set(removes) & set(sets) == set()
            assert set(SLOTS) <= set(removes) | set(sets)
            assert clear == bool(expected)
        mirrored = metrics.registry.get_sample_value(
            "mirror_sampler_decisions_total",
            {"rule": "gateway-conformance-infra/request-percentage-mirror/2", "target": "infra-backend-v3", "outcome": "mirrored"},
        )
        assert mirrored == sum(decide(b"", k, Fraction(50)) for k in keys)

    run_with_processor(transport, {"MIRROR_CONFIG": str(CONFORMANCE)}, manifest, body)


def test_request_matching_no_rule_gets_all_slots_removed(transport: str) -> None:
    with open(CONFORMANCE) as f:
        manifest = f.read()

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        (resp,) = await exchange(
            channel, headers_request({":path": b"/elsewhere", "x-request-id": b"alice", "x-mirror-cluster-0": b"infra-backend-v2"})
        )
        sets, removes, _ = mutation(resp)
        assert sets == {} and set(SLOTS) <= set(removes)

    run_with_processor(transport, {"MIRROR_CONFIG": str(CONFORMANCE)}, manifest, body)


def test_other_message_kinds_get_matching_empty_continue(transport: str) -> None:
    requests = {
        "response_headers": ProcessingRequest(response_headers=HttpHeaders()),
        "request_body": ProcessingRequest(request_body=HttpBody(body=b"x" * 10, end_of_stream=True)),
        "response_body": ProcessingRequest(response_body=HttpBody(body=b"y")),
        "request_trailers": ProcessingRequest(request_trailers=HttpTrailers()),
        "response_trailers": ProcessingRequest(response_trailers=HttpTrailers()),
    }

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        first = headers_request({":path": b"/", "x-request-id": b"alice"})
        responses = await exchange(channel, first, *requests.values())
        assert responses[0].WhichOneof("response") == "request_headers"
        for kind, resp in zip(requests, responses[1:], strict=False):
            assert resp.WhichOneof("response") == kind
            # Empty: CONTINUE and no mutation of anything.
            assert getattr(resp, kind).ByteSize() == 0

    run_with_processor(transport, SIMPLE, None, body)


def test_stream_ending_early_and_garbage_leave_server_serving(transport: str) -> None:
    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        # A stream that closes without sending anything.
        call = process_call(channel)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        # Bytes that are not a ProcessingRequest: the stream fails, not the server.
        raw = channel.stream_stream(PROCESS_METHOD)()
        await raw.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError):
            await raw.read()
        (resp,) = await exchange(channel, headers_request({":path": b"/", "x-request-id": b"alice"}))
        assert mutation(resp)[0] == {"x-mirror-cluster-0": b"shadow"}

    run_with_processor(transport, SIMPLE, None, body)


def test_non_utf8_key_is_hashed_as_raw_bytes(transport: str) -> None:
    key = b"\xff\xfe\x00k\x80"

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> bool:
        (resp,) = await exchange(channel, headers_request({":path": b"/", "x-request-id": key}))
        return bool(mutation(resp)[0])

    expected = decide(b"", key, Fraction(42))
    assert run_with_processor(transport, SIMPLE, None, body) is expected


def test_stream_keeps_its_policy_snapshot(transport: str) -> None:
    """A swap of the policy mid-stream does not change that stream's answers."""

    async def main() -> tuple[dict[str, bytes], dict[str, bytes]]:
        none = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "0"}))
        all_ = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "100"}))
        current = [none]
        async with serving(servicer_for(lambda: current[0]), transport) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = process_call(channel)
            req = headers_request({":path": b"/", "x-request-id": b"alice"})
            await call.write(req)
            first = mutation(await call.read())[0]
            current[0] = all_
            await call.write(req)
            same_stream = mutation(await call.read())[0]
            await call.done_writing()
            (resp,) = await exchange(channel, req)
            return first | same_stream, mutation(resp)[0]

    old_stream, new_stream = asyncio.run(main())
    assert old_stream == {}
    assert new_stream == {"x-mirror-cluster-0": b"shadow"}


def test_health_service_on_the_same_port(transport: str) -> None:
    """Run the real Server in-process and ask its health service."""
    from extproc.server.lifecycle import Server

    async def main() -> int:
        server = Server(
            Settings.load(
                {"MIRROR_BACKEND": "shadow", "MIRROR_LISTEN": "127.0.0.1:0", "MIRROR_METRICS_LISTEN": "off", "MIRROR_TRANSPORT": transport}
            )
        )
        task = asyncio.create_task(server.serve())
        while server.port is None:
            await asyncio.sleep(0.01)
        # The port serves before health says SERVING (set right after): wait for it.
        while server.health.status("") != 1:
            await asyncio.sleep(0.01)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                reply2 = await stub.Check(health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"))
                assert reply2.status == reply.status
                return int(reply.status)
        finally:
            server.request_stop()
            await task

    assert asyncio.run(main()) == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------
# The plan serves (and traces) exactly the decision as docs/DESIGN.md states
# it (tests/support/decision.py), whichever rule Envoy names.

MULTI = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: multi, namespace: default}
spec:
  hostnames: [a.example, "*.wild.example"]
  rules:
  - matches: [{path: {type: Exact, value: /exact}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: m1}, percent: 30}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: m2}, fraction: {numerator: 7, denominator: 10}}}
    backendRefs: [{name: p}]
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-env, value: canary}]
      method: POST
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: m1}, percent: 100}}
    backendRefs: [{name: p}]
  - matches: [{path: {type: PathPrefix, value: /none}}]
    backendRefs: [{name: p}]
  - matches: [{path: {type: RegularExpression, value: "/r/[0-9]+"}, queryParams: [{name: q, value: "1"}]}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: m2}, percent: 50}}
    backendRefs: [{name: p}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catchall, namespace: default}
spec:
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: m3}, percent: 10}}
    backendRefs: [{name: p}]
"""


def _random_headers(rng: Any) -> dict[str, bytes]:
    h: dict[str, bytes] = {
        ":path": rng.choice(
            [b"/", b"/exact", b"/exact/x", b"/api", b"/api/v1?q=1", b"/none", b"/r/12?q=1", b"/r/x?q=1", b"/other?user=bob&q=1"]
        ),
        ":method": rng.choice([b"GET", b"POST"]),
        ":authority": rng.choice([b"a.example", b"a.example:8080", b"x.wild.example", b"wild.example", b"elsewhere", b""]),
    }
    if rng.random() < 0.8:
        h["x-request-id"] = rng.choice([b"", f"id-{rng.randrange(10**6)}".encode(), b"alice", b"user-123"])
    if rng.random() < 0.3:
        h["x-env"] = rng.choice([b"canary", b"prod"])
    if rng.random() < 0.3:
        h["cookie"] = rng.choice([b"session=s1; user=carol", b"user=", b"other=1"])
    if rng.random() < 0.3:
        h["traceparent"] = rng.choice([b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", b"garbage"])
    if rng.random() < 0.2:
        h[rng.choice(SLOTS)] = b"forged"
    return h


@pytest.mark.parametrize(
    "env,manifest",
    [
        (SIMPLE, None),
        ({"MIRROR_BACKEND": "shadow", "MIRROR_FRACTION": "5/1000", "MIRROR_SALT": "v2"}, None),
        ({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "0"}, None),
        ({"MIRROR_CONFIG": "x", "MIRROR_KEY": "cookie:user,query:user,traceparent,header:x-request-id"}, "multi"),
        ({"MIRROR_CONFIG": "x"}, "multi"),
        ({"MIRROR_CONFIG": "x"}, "conformance"),
    ],
)
def test_compiled_plan_serves_and_traces_the_reference_decision(env: dict[str, str], manifest: str | None) -> None:
    import random
    from pathlib import Path

    text = {"multi": MULTI, "conformance": Path(CONFORMANCE).read_text() if manifest == "conformance" else None, None: None}[manifest]
    policy = build_policy(Settings.load(env), text)
    metrics = Metrics()
    plan = Plan(policy, metrics)
    rule_ids = [None, "no/such/rule", *(r.id for r in policy.rules)]
    rng = random.Random(4)
    expected_counts: dict[tuple[str, str, str], int] = {}
    for _ in range(3000):
        headers = _random_headers(rng)
        if manifest == "conformance":
            headers[":path"] = rng.choice(
                [b"/percent-mirror", b"/percent-mirror-fraction/x", b"/percent-multi-mirror-and-modify-headers", b"/x"]
            )
        rule_id = rng.choice(rule_ids)
        reference = reference_outcomes(policy, headers, rule_id)
        want = tuple((t.slot, t.backend) for t, outcome in reference if outcome is Outcome.MIRRORED)
        trace = plan.trace(headers, rule_id=rule_id)
        assert [(t.target, t.outcome) for t in trace.targets] == reference, headers
        assert trace.rule is reference_rule(policy, headers, rule_id)
        assert plan.sampled(headers, rule_id=rule_id) == want, headers
        forged = any(n in headers for n in policy.slot_names)
        assert plan.answer(headers, rule_id=rule_id) == plan.responder.response(want, forged)
        if trace.rule is not None:
            for t, result in reference:
                k = (trace.rule.id, t.backend, result.value)
                expected_counts[k] = expected_counts.get(k, 0) + 2  # sampled() and answer() each count once
    for (rule, target, outcome), n in expected_counts.items():
        got = metrics.registry.get_sample_value("mirror_sampler_decisions_total", {"rule": rule, "target": target, "outcome": outcome})
        assert got == n, (rule, target, outcome)


def test_rule_named_by_envoy_wins_over_own_matching(transport: str) -> None:
    """With x-mirror-rule-id metadata the sampler decides for that rule even
    where its own matching would pick another (here: rule 0 at 20% for a path
    of rule 1 at 25/50)."""
    with open(CONFORMANCE) as f:
        manifest = f.read()
    keys = [f"user-{i}".encode() for i in range(200)]

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> tuple[int, int]:
        named = plain = 0
        for key in keys:
            req = headers_request({":path": b"/percent-mirror-fraction", "x-request-id": key})
            call = channel.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)(
                metadata=(("x-mirror-rule-id", "gateway-conformance-infra/request-percentage-mirror/0"),)
            )
            await call.write(req)
            named += bool(mutation(await call.read())[0])
            await call.done_writing()
            (resp,) = await exchange(channel, req)
            plain += bool(mutation(resp)[0])
        return named, plain

    named, plain = run_with_processor(transport, {"MIRROR_CONFIG": str(CONFORMANCE)}, manifest, body)
    assert named == sum(decide(b"", k, Fraction(20)) for k in keys)
    assert plain == sum(decide(b"", k, Fraction(25, 50)) for k in keys)
    assert named != plain


def test_repeated_header_matches_on_any_value_over_the_wire(transport: str) -> None:
    manifest = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  rules:
  - matches: [{headers: [{name: x-env, value: canary}]}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}]
    backendRefs: [{name: web}]
"""

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> list[bool]:
        out = []
        for values in ([b"canary"], [b"prod", b"canary"], [b"prod"]):
            headers = [HeaderValue(key=":path", raw_value=b"/"), HeaderValue(key="x-request-id", raw_value=b"k")]
            headers += [HeaderValue(key="x-env", raw_value=v) for v in values]
            req = ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=headers)))
            (resp,) = await exchange(channel, req)
            out.append(bool(mutation(resp)[0]))
        return out

    assert run_with_processor(transport, {"MIRROR_CONFIG": "r.yaml"}, manifest, body) == [True, True, False]


def test_bytes_that_are_no_processing_request_are_counted_and_end_the_stream(transport: str) -> None:
    """Never from Envoy; both transports end the stream with INTERNAL, the other streams go on."""

    async def body(channel: grpc.aio.Channel, metrics: Metrics) -> None:
        call = channel.stream_stream(PROCESS_METHOD, None, None)()
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert metrics.registry.get_sample_value("mirror_sampler_errors_total", {"kind": "malformed_message"}) == 1
        (resp,) = await exchange(channel, headers_request({":path": b"/", "x-request-id": b"alice"}))
        assert resp.WhichOneof("response") == "request_headers"

    run_with_processor(transport, SIMPLE, None, body)

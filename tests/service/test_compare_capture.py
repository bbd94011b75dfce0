"""The observer over real HTTP/2 connections (grpcio's client, as Envoy's
capture filters use it): streams become captures and joins, each ended as
soon as its response is complete; streams it cannot use are counted and end
alone, hostile input costs its stream or connection only, and the observer
keeps serving."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.noise import Result
from extproc.compare.records import CAPTURE_METADATA, CaptureTag, Side
from extproc.compare.store import CompareStore
from extproc.stack.children import Child
from extproc.wire import PROCESS_METHOD, HeaderMap, HeaderValue, HttpBody, HttpHeaders, ProcessingRequest
from tests.service.h2peer import CANCEL, RST_STREAM, Peer, frame, grpc_frame
from tests.support.procs import scrape, wait_until

RULE = "shop/web/0"
CONFIG = CompareConfig(rules={RULE: RuleCompare(targets=("candidate",))})


class Observer(Child):
    def __init__(self, tmp: Path) -> None:
        (tmp / "compare.yaml").write_text(f"compare:\n  bodyLimit: 1024\n  rules:\n  - {{rule: {RULE}, targets: [candidate]}}\n")
        argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                "--db", str(tmp / "c.db"), "--config", str(tmp / "compare.yaml")]  # fmt: skip
        super().__init__("observer", argv)
        ready = self.wait_event("compare_serving")
        self.port, self.metrics_port = int(ready["port"]), int(ready["metrics_port"])

    def dropped(self, reason: str) -> float:
        return scrape(self.metrics_port, "mirror_sampler_compare_dropped_total", {"reason": reason})

    def connection_errors(self) -> float:
        return scrape(self.metrics_port, "mirror_sampler_compare_connection_errors_total")


@pytest.fixture
def observer(tmp_path: Path) -> Iterator[Observer]:
    o = Observer(tmp_path)
    yield o
    o.stop()


def headers(**values: str) -> HttpHeaders:
    return HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in values.items()]))


def request(rid: str) -> ProcessingRequest:
    return ProcessingRequest(request_headers=headers(**{":method": "GET", ":path": "/p", "x_request_id": rid}), observability_mode=True)


def response(status: str, body: bytes) -> list[ProcessingRequest]:
    return [
        ProcessingRequest(response_headers=headers(**{":status": status, "x_envoy_upstream_service_time": "4"}), observability_mode=True),
        ProcessingRequest(response_body=HttpBody(body=body, end_of_stream=True), observability_mode=True),
    ]


def stream(port: int, messages: Iterator[bytes], tag: str | None) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(PROCESS_METHOD)
        metadata = [(CAPTURE_METADATA, tag)] if tag is not None else []
        responses = call(messages, metadata=metadata, timeout=10)
        assert list(responses) == [], "observability mode: never an answer"
        code: grpc.StatusCode = responses.code()
        return code


def serialized(messages: list[ProcessingRequest]) -> Iterator[bytes]:
    return (m.SerializeToString() for m in messages)


def held_open(messages: list[ProcessingRequest], release: threading.Event) -> Iterator[bytes]:
    """The messages, then no END_STREAM until ``release`` (Envoy keeps a capture
    stream open after the response, until its deferred close)."""
    yield from serialized(messages)
    release.wait(30)


PRIMARY = CaptureTag(Side.PRIMARY, RULE, ("candidate",)).encode()
SHADOW = CaptureTag(Side.SHADOW, RULE, ("candidate",)).encode()


def test_a_primary_and_a_shadow_stream_are_joined_and_judged(observer: Observer, tmp_path: Path) -> None:
    assert stream(observer.port, serialized([request("r1"), *response("200", b'{"v":1}')]), PRIMARY) == grpc.StatusCode.OK
    assert stream(observer.port, serialized([request("r1"), *response("200", b'{"v":2}')]), SHADOW) == grpc.StatusCode.OK
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: len(store.comparisons()) == 1, timeout=10)
    [c] = store.comparisons()
    assert (c.request_id, c.target, c.result, c.fields) == ("r1", "candidate", Result.DIFFERS, ({"path": "body.v"},))
    assert (c.primary_ms, c.shadow_ms) == (4.0, 4.0)


def test_the_observer_ends_a_stream_once_the_body_passes_the_bound(observer: Observer, tmp_path: Path) -> None:
    pulled = 0

    def endless() -> Iterator[bytes]:
        nonlocal pulled
        yield request("big").SerializeToString()
        yield response("200", b"")[0].SerializeToString()
        for _ in range(10_000):
            pulled += 1
            yield ProcessingRequest(response_body=HttpBody(body=b"x" * 4096), observability_mode=True).SerializeToString()

    assert stream(observer.port, endless(), PRIMARY) == grpc.StatusCode.OK
    assert pulled < 10_000, "the call ended long before the body did"
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: store.pending_count() == 1, timeout=10)


def test_a_stream_is_ended_as_soon_as_its_response_is_complete(observer: Observer, tmp_path: Path) -> None:
    """The client has not finished sending: the observer ends the call (OK)
    once it has the whole response, so Envoy frees the stream."""
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{observer.port}") as channel:
            responses = channel.stream_stream(PROCESS_METHOD)(
                held_open([request("open"), *response("200", b"{}")], release), metadata=[(CAPTURE_METADATA, PRIMARY)], timeout=20
            )
            assert list(responses) == [] and responses.code() == grpc.StatusCode.OK
            assert not release.is_set(), "ended by the observer, not by the client"
    finally:
        release.set()
    store = CompareStore(tmp_path / "c.db", CONFIG)
    wait_until(lambda: store.pending_count() == 1, 10, "the capture stored")
    assert observer.dropped("incomplete_stream") == 0


def test_a_stream_reset_before_its_response_is_complete_is_counted(observer: Observer) -> None:
    """RST_STREAM CANCEL after the request headers (Envoy's, when the downstream
    request is reset): counted as incomplete, the connection serves on."""
    with Peer(observer.port) as peer:
        peer.handshake()
        peer.open(1, extra=[(CAPTURE_METADATA, PRIMARY)])
        peer.data(1, grpc_frame(request("cut").SerializeToString()))
        peer.send(frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")))
        wait_until(lambda: observer.dropped("incomplete_stream") == 1, 10, "the reset stream counted")
        peer.open(3, extra=[(CAPTURE_METADATA, PRIMARY)])
        for message in [request("after"), *response("200", b"")]:
            peer.data(3, grpc_frame(message.SerializeToString()))
        messages, trailers = peer.response(3)
        assert (messages, trailers["grpc-status"]) == ([], "0"), "ended by the observer once complete"
    assert observer.connection_errors() == 0


def test_hostile_input_costs_its_stream_or_connection_only(observer: Observer, tmp_path: Path) -> None:
    # Tags that are not ours: counted, the stream ends.
    for tag in ("not json", '{"side":"primary","rule":"r","targets":"xy"}', '{"side":"shadow","rule":"r","targets":["a","b"]}', "[" * 5000):
        assert stream(observer.port, serialized([request("t"), *response("200", b"")]), tag) == grpc.StatusCode.OK
    wait_until(lambda: observer.dropped("bad_tag") == 4, 10, "four bad tags counted")
    # A message past the transport's 4 MiB bound: that stream ends RESOURCE_EXHAUSTED.
    huge = ProcessingRequest(response_body=HttpBody(body=b"x" * (5 << 20)), observability_mode=True)
    with grpc.insecure_channel(f"127.0.0.1:{observer.port}") as channel:
        messages = serialized([request("huge"), huge])
        call = channel.stream_stream(PROCESS_METHOD)(messages, metadata=[(CAPTURE_METADATA, PRIMARY)], timeout=20)
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Not HTTP/2 at all: that connection is closed and counted.
    with socket.create_connection(("127.0.0.1", observer.port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        while raw.recv(65536):  # the GOAWAY, then the close
            pass
    wait_until(lambda: observer.connection_errors() == 1, 10, "the connection error counted")
    test_a_primary_and_a_shadow_stream_are_joined_and_judged(observer, tmp_path)
    assert observer.alive()


def test_sigterm_stores_what_was_captured_and_exits_zero(observer: Observer, tmp_path: Path) -> None:
    """The writer's batch window is not a loss: a capture taken just before
    SIGTERM is in the store once the observer has exited."""
    assert stream(observer.port, serialized([request("last"), *response("200", b"{}")]), PRIMARY) == grpc.StatusCode.OK
    assert observer.stop() == 0
    assert CompareStore(tmp_path / "c.db", CONFIG).pending_count() == 1


def test_the_observer_answers_health_checks(observer: Observer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{observer.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_streams_the_observer_cannot_use_are_counted_and_it_keeps_serving(observer: Observer, tmp_path: Path) -> None:
    assert stream(observer.port, serialized([request("x"), *response("200", b"")]), None) == grpc.StatusCode.OK
    wait_until(lambda: observer.dropped("bad_tag") == 1)
    assert stream(observer.port, iter([b"\xff\xff\xff garbage"]), PRIMARY) == grpc.StatusCode.OK
    wait_until(lambda: observer.dropped("malformed_message") == 1)
    assert stream(observer.port, serialized([request("cut")]), PRIMARY) == grpc.StatusCode.OK
    wait_until(lambda: observer.dropped("incomplete_stream") == 1)
    test_a_primary_and_a_shadow_stream_are_joined_and_judged(observer, tmp_path)
    assert observer.alive()


def test_a_valid_edit_of_the_settings_applies_live_and_an_invalid_one_is_refused(observer: Observer, tmp_path: Path) -> None:
    def reloads(result: str) -> float:
        return scrape(observer.metrics_port, "mirror_sampler_compare_reloads_total", {"result": result})

    def judged(rid: str) -> list[tuple[Result, tuple[dict[str, str], ...]]]:
        assert stream(observer.port, serialized([request(rid), *response("200", b'{"v":1,"w":1}')]), PRIMARY) == grpc.StatusCode.OK
        assert stream(observer.port, serialized([request(rid), *response("200", b'{"v":2,"w":2}')]), SHADOW) == grpc.StatusCode.OK
        store = CompareStore(tmp_path / "c.db", CONFIG)
        wait_until(lambda: len(store.comparisons(rid)) == 1, timeout=10)
        return [(c.result, c.fields) for c in store.comparisons(rid)]

    assert judged("before") == [(Result.DIFFERS, ({"path": "body.v"}, {"path": "body.w"}))]
    settings = tmp_path / "compare.yaml"
    settings.write_text(f"compare:\n  rules:\n  - {{rule: {RULE}, targets: [candidate], ignore: [body.v]}}\n")
    wait_until(lambda: reloads("ok") == 1, timeout=10)
    assert judged("after") == [(Result.DIFFERS, ({"path": "body.w"},))]
    settings.write_text(f"compare:\n  rules:\n  - {{rule: {RULE}, targets: [candidate], ignor: [body.w]}}\n")
    wait_until(lambda: reloads("invalid") == 1, timeout=10)
    refusal = "compare.rules[0].ignor: unknown field; did you mean ignore?"
    wait_until(lambda: refusal in observer.output(), 10, "the observer logging why it refused the edit")
    assert judged("refused") == [(Result.DIFFERS, ({"path": "body.w"},))], "the settings in force stay"


ROUTES_WITH_COMPARE = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {{name: shop}}
spec:
  compare:
    rules:
    - {{rule: default/shop/0, targets: [candidate]{extra}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: default}}
spec:
  rules:
  - backendRefs: [{{name: primary, port: 8080}}]
    filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: candidate, port: 8081}}, percent: 50}}
"""


def test_the_observer_reads_and_reloads_compare_from_the_routes_file(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES_WITH_COMPARE.format(extra=""))
    argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--db", str(tmp_path / "c.db"), "--config", str(routes)]  # fmt: skip
    child = Child("observer", argv)
    try:
        ready = child.wait_event("compare_serving")
        assert ready["rules"] == ["default/shop/0"]
        metrics_port = int(ready["metrics_port"])

        def reloads(result: str) -> float:
            return scrape(metrics_port, "mirror_sampler_compare_reloads_total", {"result": result})

        routes.write_text(ROUTES_WITH_COMPARE.format(extra=", ignore: [body.v]"))
        wait_until(lambda: reloads("ok") == 1, timeout=10)
        routes.write_text(ROUTES_WITH_COMPARE.format(extra=", ignore: [body.v], ignore: [body.w]"))
        wait_until(lambda: reloads("invalid") == 1, timeout=10)
        refusal = "spec.compare.rules[0].ignore: duplicate key 'ignore' at line 7 (first at line 7)"
        wait_until(lambda: refusal in child.output(), 10, "the observer logging why it refused the edit")
    finally:
        child.stop()


def test_an_edit_made_between_start_up_and_the_watch_is_applied(tmp_path: Path) -> None:
    """The watch judges contents against the text the settings in force came
    from, not against what the file holds when the watch starts (regression:
    such an edit passed for the start-up settings and never applied)."""
    import asyncio

    from extproc.compare.capture import ObserverSettings, watch
    from extproc.compare.cli import parse_config_text
    from extproc.compare.metrics import CompareMetrics
    from extproc.compare.paths import Pattern

    path = tmp_path / "compare.yaml"
    start_up = "compare:\n  rules:\n  - {rule: r/x/0, targets: [b]}\n"
    config = parse_config_text(start_up, str(path))
    path.write_text(start_up.replace("targets: [b]", "targets: [b], ignore: [body.v]"))
    applied: list[CompareConfig] = []

    async def observe() -> None:
        stop = asyncio.Event()

        def apply(new: CompareConfig) -> None:
            applied.append(new)
            stop.set()

        settings = ObserverSettings(
            "127.0.0.1", 0, config, str(tmp_path / "c.db"), lambda t: parse_config_text(t, str(path)), str(path), start_up
        )
        await asyncio.wait_for(watch(settings, apply, CompareMetrics(), stop), timeout=10)

    asyncio.run(observe())
    assert [c.rule("r/x/0").diff_rules.ignored for c in applied] == [(Pattern.of("body.v"),)]

"""Hostile and malformed ext_proc streams: the servicer always answers validly
or ends the stream cleanly, keeps serving others, and never mirrors a request
the decision function would not mirror."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import Settings, build_policy
from extproc.metrics import Metrics
from extproc.sampling import Fraction, decide
from extproc.service import ExternalProcessor, Responder, generic_handler
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

SLOTS = ("x-mirror-cluster-0", "x-mirror-cluster-1")
FRACTION = Fraction(30)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A real grpc.aio server on loopback, in its own thread and event loop."""
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "30"}))
    responder = Responder(policy)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((generic_handler(ExternalProcessor(lambda: responder, Metrics())),))
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["server"] = server
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield state["port"]
    finally:
        asyncio.run_coroutine_threadsafe(state["server"].stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def channel(port: int) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        yield ch


def call(channel: grpc.Channel, requests: list[ProcessingRequest]) -> list[ProcessingResponse]:
    stub = channel.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)
    return list(stub(iter(requests), timeout=10))


names = st.one_of(
    st.sampled_from([":path", ":authority", ":method", "x-request-id", "cookie", "traceparent", *SLOTS, "X-Mirror-Cluster-0", "x-mirror-rule"]),
    st.text(min_size=0, max_size=20),
)
raw_values = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\xff\xfe", b"shadow", b"x" * 65536]))
header_values = st.builds(
    lambda k, raw, text, which: HeaderValue(key=k, raw_value=raw) if which == 0 else HeaderValue(key=k, value=text) if which == 1 else HeaderValue(key=k),
    names,
    raw_values,
    st.text(max_size=30),
    st.integers(0, 2),
)
header_maps = st.lists(header_values, max_size=40).map(lambda hs: HeaderMap(headers=hs))
messages = st.one_of(
    st.builds(lambda h, eos: ProcessingRequest(request_headers=HttpHeaders(headers=h, end_of_stream=eos)), header_maps, st.booleans()),
    st.builds(lambda h: ProcessingRequest(response_headers=HttpHeaders(headers=h)), header_maps),
    st.builds(lambda b: ProcessingRequest(request_body=HttpBody(body=b, end_of_stream=True)), st.binary(max_size=2048)),
    st.builds(lambda b: ProcessingRequest(response_body=HttpBody(body=b)), st.binary(max_size=64)),
    st.builds(lambda h: ProcessingRequest(request_trailers=HttpTrailers(trailers=h)), header_maps),
    st.builds(lambda h: ProcessingRequest(response_trailers=HttpTrailers(trailers=h)), header_maps),
    st.just(ProcessingRequest()),  # no kind at all
)


def expected_slots(request: ProcessingRequest) -> set[str]:
    """What the decision function allows: slot 0 iff the first non-empty
    x-request-id (raw_value, else value) is in the 30% sample."""
    first: bytes | None = None
    for h in request.request_headers.headers.headers:
        if h.key.lower() == "x-request-id":
            first = h.raw_value or h.value.encode("utf-8", "surrogateescape")
            break
    return {"x-mirror-cluster-0"} if first and decide(b"", first, FRACTION) else set()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=st.lists(messages, min_size=0, max_size=6))
def test_any_stream_gets_valid_answers_and_never_an_unearned_mirror(channel: grpc.Channel, stream: list[ProcessingRequest]) -> None:
    responses = call(channel, stream)
    answerable = [r for r in stream if r.WhichOneof("request") is not None]
    # One answer per known message, of the matching kind, in order.
    assert [r.WhichOneof("response") for r in responses] == [r.WhichOneof("request") for r in answerable]
    for request, response in zip(answerable, responses):
        if request.WhichOneof("request") != "request_headers":
            assert getattr(response, response.WhichOneof("response")).ByteSize() == 0
            continue
        mutation = response.request_headers.response.header_mutation
        set_slots = {o.header.key for o in mutation.set_headers}
        assert set_slots <= expected_slots(request)
        assert all(o.header.raw_value == b"shadow" and not o.header.value for o in mutation.set_headers)
        # Every slot not set is removed, whatever the client sent.
        assert set(SLOTS) <= set(mutation.remove_headers) | set_slots


def test_thousands_of_headers_and_huge_values(channel: grpc.Channel) -> None:
    headers = [HeaderValue(key=f"x-h-{i}", raw_value=b"v" * 100) for i in range(5000)]
    headers += [HeaderValue(key="x-request-id", raw_value=b"k" * (1 << 20)), HeaderValue(key=":path", raw_value=b"/")]
    (response,) = call(channel, [ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=headers)))])
    sampled = decide(b"", b"k" * (1 << 20), FRACTION)
    assert bool(response.request_headers.response.header_mutation.set_headers) is sampled


def test_garbage_bytes_end_that_stream_only(channel: grpc.Channel) -> None:
    raw = channel.stream_stream(PROCESS_METHOD)  # no serializers: raw bytes
    with pytest.raises(grpc.RpcError):
        list(raw(iter([b"\x0a\xff\xff\xff\xff"]), timeout=5))
    ok = call(channel, [ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key="x-request-id", raw_value=b"alice")])))])
    assert ok[0].WhichOneof("response") == "request_headers"


def test_streams_cancelled_mid_way_leave_the_server_serving(channel: grpc.Channel) -> None:
    stub = channel.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)

    def endless() -> Iterator[ProcessingRequest]:
        while True:
            yield ProcessingRequest(request_headers=HttpHeaders())

    for _ in range(20):
        responses = stub(endless(), timeout=5)
        next(responses)
        responses.cancel()
    ok = call(channel, [ProcessingRequest(request_headers=HttpHeaders())])
    assert ok[0].WhichOneof("response") == "request_headers"

"""Hostile and malformed ext_proc streams: the servicer always answers validly
or ends the stream cleanly, keeps serving others, and never mirrors a request
the decision function would not mirror."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.sampling import Fraction, decide
from extproc.server.transports import TRANSPORTS
from extproc.wire import (
    PROCESS_METHOD,
    HeaderMap,
    HeaderValue,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from tests.support.inprocess import BackgroundServer, servicer_for
from tests.support.strategies import messages

SLOTS = ("x-mirror-cluster-0", "x-mirror-cluster-1")
FRACTION = Fraction(30)


@pytest.fixture(scope="module", params=TRANSPORTS)
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    """The real servicer behind each transport on loopback, in its own thread and event loop."""
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "30"}))
    with BackgroundServer(servicer_for(policy), request.param) as bound:
        yield bound


@pytest.fixture(scope="module")
def channel(port: int) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        yield ch


def call(channel: grpc.Channel, requests: list[ProcessingRequest]) -> list[ProcessingResponse]:
    stub = channel.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)
    return list(stub(iter(requests), timeout=10))


def expected_slots(request: ProcessingRequest) -> set[str]:
    """What the decision function allows: slot 0 iff the first non-empty
    x-request-id (raw_value, else value) is in the 30% sample: exactly these
    are set, no fewer (a sampler that never mirrors fails) and no more."""
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
    for request, response in zip(answerable, responses, strict=True):
        if request.WhichOneof("request") != "request_headers":
            assert getattr(response, response.WhichOneof("response")).ByteSize() == 0
            continue
        mutation = response.request_headers.response.header_mutation
        set_slots = {o.header.key for o in mutation.set_headers}
        assert set_slots == expected_slots(request)
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
    ok = call(
        channel,
        [ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key="x-request-id", raw_value=b"alice")])))],
    )
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

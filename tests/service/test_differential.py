"""One contract, two implementations: the same generated ProcessingRequest
streams, sent over grpcio's client to each transport, get byte-identical
answers (and the same gRPC status)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.server.transports import TRANSPORTS
from extproc.wire import PROCESS_METHOD, RULE_METADATA, ProcessingRequest
from tests.support.inprocess import BackgroundServer, servicer_for
from tests.support.paths import CONFORMANCE
from tests.support.strategies import messages

Answer = tuple[grpc.StatusCode, tuple[bytes, ...]]


@pytest.fixture(scope="module")
def channels() -> Iterator[dict[str, grpc.Channel]]:
    """The conformance policy (three rules, one with two targets) behind each transport."""
    policy = build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE)}), CONFORMANCE.read_text())
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with BackgroundServer(servicer_for(policy), "http2") as http2, BackgroundServer(servicer_for(policy), "grpcio") as grpcio:
        ports = {"http2": http2, "grpcio": grpcio}
        opened = {name: grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for name, port in ports.items()}
        try:
            yield opened
        finally:
            for channel in opened.values():
                channel.close()


def answers(channel: grpc.Channel, stream: list[bytes], rule_id: str | None) -> Answer:
    # Raw bytes both ways: what the transport put on the wire, not a re-serialisation.
    call = channel.stream_stream(PROCESS_METHOD, None, None)
    metadata = ((RULE_METADATA, rule_id),) if rule_id else None
    got: list[bytes] = []
    try:
        for answer in call(iter(stream), timeout=10, metadata=metadata):
            got.append(answer)
    except grpc.RpcError as e:
        return e.code(), tuple(got)
    return grpc.StatusCode.OK, tuple(got)


# Mostly ProcessingRequests, sometimes bytes that are not one (never from Envoy).
wire_messages = st.one_of(messages.map(ProcessingRequest.SerializeToString), st.binary(max_size=64).filter(lambda b: not _parses(b)))


def _parses(data: bytes) -> bool:
    try:
        ProcessingRequest.FromString(data)
    except DecodeError:
        return False
    return True


rule_ids = st.sampled_from([None, *(f"gateway-conformance-infra/request-percentage-mirror/{i}" for i in range(3)), "no/such/rule"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=st.lists(wire_messages, min_size=0, max_size=6), rule_id=rule_ids)
def test_both_transports_answer_byte_for_byte_alike(channels: dict[str, grpc.Channel], stream: list[bytes], rule_id: str | None) -> None:
    results = {name: answers(channel, stream, rule_id) for name, channel in channels.items()}
    assert set(TRANSPORTS) == set(results)
    assert results["http2"] == results["grpcio"]

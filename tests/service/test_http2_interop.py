"""The HTTP/2 transport against grpcio's client: what a real gRPC stack (and
Envoy's health checker) sees. Plaintext, TLS and mutual TLS."""

from __future__ import annotations

import queue
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.server.tls import server_ssl_context
from extproc.wire import PROCESS_METHOD, SERVICE_NAME, HeaderMap, HeaderValue, HttpHeaders, ProcessingRequest, ProcessingResponse
from tests.service.h2peer import FakeServicer, Peer, ServerThread, grpc_frame, server_thread
from tests.support.inprocess import servicer_for
from tests.support.pki import make_pki
from tests.support.procs import wait_until


@pytest.fixture
def fake() -> FakeServicer:
    return FakeServicer()


@pytest.fixture
def srv(fake: FakeServicer) -> Iterator[ServerThread]:
    with server_thread(fake) as s:
        yield s


@pytest.fixture
def channel(srv: ServerThread) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=options) as ch:
        yield ch


def _process(channel: grpc.Channel) -> Any:
    return channel.stream_stream(PROCESS_METHOD)


def _headers_request(request_id: str) -> bytes:
    headers = HeaderMap(headers=[HeaderValue(key=":path", raw_value=b"/"), HeaderValue(key="x-request-id", raw_value=request_id.encode())])
    return bytes(ProcessingRequest(request_headers=HttpHeaders(headers=headers)).SerializeToString())


def test_process_with_the_real_servicer() -> None:
    servicer = servicer_for(build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"})))
    requests = [_headers_request(f"req-{i}") for i in range(20)]
    expected = []
    for request in requests:
        stream = servicer.open_stream(None)
        expected.append(stream.message(request))
        stream.close()
    with server_thread(servicer) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        call = _process(ch)
        for request, answer in zip(requests, expected, strict=True):
            replies = list(call(iter([request])))
            assert replies == [answer]
            assert ProcessingResponse.FromString(replies[0]).WhichOneof("response") == "request_headers"
        # Several messages on one stream: each answered, in order.
        assert list(call(iter(requests[:3]))) == expected[:3]
        wait_until(lambda: srv.stream_count() == 0)


def test_concurrent_streams_share_one_connection(srv: ServerThread, channel: grpc.Channel, fake: FakeServicer) -> None:
    call = _process(channel)

    def one(i: int) -> list[bytes]:
        return list(call(iter([f"{i}-a".encode(), f"{i}-b".encode(), f"{i}-c".encode()]), metadata=[("x-mirror-rule-id", f"r{i}")]))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    for i, replies in enumerate(results):
        assert replies == [f"echo:r{i}:{i}-{x}".encode() for x in "abc"]
    assert srv.connection_count() == 1
    wait_until(lambda: srv.stream_count() == 0)
    assert len(fake.streams) == 64 and all(s.closed == 1 for s in fake.streams)


def test_half_close_gets_ok_trailers(channel: grpc.Channel) -> None:
    responses = _process(channel)(iter([b"x", b"y"]))
    assert list(responses) == [b"echo::x", b"echo::y"]
    assert responses.code() == grpc.StatusCode.OK


def test_cancel_frees_the_stream(srv: ServerThread, channel: grpc.Channel, fake: FakeServicer) -> None:
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := outbox.get()) is not None:
            yield item

    responses = _process(channel)(requests())
    outbox.put(b"first")
    assert next(responses) == b"echo::first"
    assert srv.stream_count() == 1
    responses.cancel()
    outbox.put(None)
    wait_until(lambda: srv.stream_count() == 0)
    assert [s.closed for s in fake.streams] == [1]
    assert responses.code() == grpc.StatusCode.CANCELLED


def test_servicer_error_is_internal(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(_process(channel)(iter([b"boom"])))
    assert err.value.code() == grpc.StatusCode.INTERNAL


def test_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/no.Such/Method")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_large_messages_cross_flow_control(channel: grpc.Channel) -> None:
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB: several windows' worth each way
    assert list(_process(channel)(iter([big]))) == [b"echo::" + big]
    with pytest.raises(grpc.RpcError) as err:
        list(_process(channel)(iter([b"z" * (4 * 1024 * 1024 + 1)])))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_check(channel: grpc.Channel, srv: ServerThread) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    srv.set_serving(False)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_watch_sees_changes_and_drain(fake: FakeServicer) -> None:
    srv = ServerThread(fake)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            srv.set_serving(False)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            srv.health.set_all(True)  # from another thread than the server's loop: still pushed
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            unknown.cancel()
            wait_until(lambda: srv.stream_count() == 1)
            # The lifecycle's drain: NOT_SERVING first (pushed), then stop() ends the stream.
            srv.call(lambda: srv.health.set_all(False))
            stopping = threading.Thread(target=srv.stop, args=(5.0,))
            stopping.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                next(watch)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            stopping.join(5)
            assert not stopping.is_alive()
    finally:
        srv.close()


# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = make_pki(tmp_path_factory.mktemp("pki"))
    # This file's names: the sampler's certificate is the server's, Envoy's the client's.
    return {
        "ca.crt": d / "ca.crt",
        "server.crt": d / "sampler.crt",
        "server.key": d / "sampler.key",
        "client.crt": d / "envoy.crt",
        "client.key": d / "envoy.key",
    }


def _secure_check(port: int, pki: dict[str, Path], *, client_cert: bool) -> int:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca.crt"].read_bytes(),
        private_key=pki["client.key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client.crt"].read_bytes() if client_cert else None,
    )
    with grpc.secure_channel(f"localhost:{port}", creds) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        status = int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
        assert list(ch.stream_stream(PROCESS_METHOD)(iter([b"tls"]), timeout=5)) == [b"echo::tls"]
        return status


def test_tls(fake: FakeServicer, pki: dict[str, Path]) -> None:
    ctx = server_ssl_context(str(pki["server.crt"]), str(pki["server.key"]), None)
    with server_thread(fake, ssl=ctx) as srv:
        assert _secure_check(srv.port, pki, client_cert=False) == health_pb2.HealthCheckResponse.SERVING


def test_tls_negotiates_h2_by_alpn(fake: FakeServicer, pki: dict[str, Path]) -> None:
    ctx = server_ssl_context(str(pki["server.crt"]), str(pki["server.key"]), None)
    client = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    client.set_alpn_protocols(["h2", "http/1.1"])
    with server_thread(fake, ssl=ctx) as srv, Peer(srv.port, tls=client) as p:
        assert isinstance(p.sock, ssl.SSLSocket) and p.sock.selected_alpn_protocol() == "h2"
        p.handshake()
        p.open(1)
        p.data(1, grpc_frame(b"raw-tls"), end=True)
        assert p.response(1) == ([b"echo::raw-tls"], {"grpc-status": "0"})


def test_mutual_tls(fake: FakeServicer, pki: dict[str, Path]) -> None:
    ctx = server_ssl_context(str(pki["server.crt"]), str(pki["server.key"]), str(pki["ca.crt"]))
    with server_thread(fake, ssl=ctx) as srv:
        assert _secure_check(srv.port, pki, client_cert=True) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            _secure_check(srv.port, pki, client_cert=False)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

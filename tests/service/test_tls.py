"""TLS and mutual TLS on the sampler's port, and Envoy configured to use them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config.errors import ConfigError
from extproc.config.settings import Settings
from extproc.stack.up import LocalStack
from tests.support.harness import Client, received, settle
from tests.support.pki import make_pki
from tests.support.procs import Sampler

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: Path) -> dict[str, str]:
    return {
        "MIRROR_TLS_CERT": str(pki / "sampler.crt"),
        "MIRROR_TLS_KEY": str(pki / "sampler.key"),
        "MIRROR_TLS_CLIENT_CA": str(pki / "ca.crt"),
    }


def health(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    target = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3).status)


def test_mutual_tls_admits_only_clients_with_a_certificate(pki: Path, transport: str) -> None:
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_BACKEND": "shadow", **tls_env(pki)})
    try:
        ca = (pki / "ca.crt").read_bytes()
        with_cert = grpc.ssl_channel_credentials(ca, (pki / "envoy.key").read_bytes(), (pki / "envoy.crt").read_bytes())
        assert health(s.port, with_cert) == health_pb2.HealthCheckResponse.SERVING
        for refused in (grpc.ssl_channel_credentials(ca), None):  # no client certificate; plaintext
            with pytest.raises(grpc.RpcError):
                health(s.port, refused)
    finally:
        s.stop()


def test_tls_settings_must_come_together() -> None:
    with pytest.raises(ConfigError) as e:
        Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_TLS_CERT": "c.pem"})
    assert "MIRROR_TLS_KEY" in e.value.problems[0]
    with pytest.raises(ConfigError):
        Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_TLS_CLIENT_CA": "ca.pem"})


@pytest.fixture
def gateway(pki: Path, tmp_path: Path, transport: str) -> Iterator[LocalStack]:
    gw = LocalStack(
        Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_TRANSPORT": transport, **tls_env(pki)}),
        listener_port=0,
        admin_port=0,
        log_dir=tmp_path,
        sampler_ca=str(pki / "ca.crt"),
        sampler_client_cert=str(pki / "envoy.crt"),
        sampler_client_key=str(pki / "envoy.key"),
    )
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def test_envoy_mirrors_through_a_mutual_tls_sampler(gateway: LocalStack) -> None:
    client = Client(gateway.url)
    for i in range(5):
        assert client.request(f"/tls/{i}", "any", {"x-request-id": f"tls-{i}"})[0] == 200
    client.close()
    # 100%: every request mirrored, so every ext_proc stream crossed mutual TLS.
    assert settle(gateway, {"shadow": 5}) == {"shadow": 5}
    assert gateway.stat("cluster.mirror-sampler.ssl.handshake") >= 1
    assert received(gateway, "backend") == 5

"""TLS and mutual TLS on the sampler's port, and Envoy configured to use them."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config.errors import ConfigError
from extproc.config.settings import Settings
from extproc.stack.up import LocalStack
from tests.support.harness import Client, received, settle
from tests.support.procs import Sampler

pytestmark = pytest.mark.e2e


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Certificate | None, ca: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("mirror-sampler test CA", None, None, ca=True)
    _write(d / "ca", None, ca)
    for name in ("sampler", "envoy"):
        key, cert = _issue(name, ca_key, ca)
        _write(d / name, key, cert)
    return d


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

"""Certificates made at run time for the TLS and mutual TLS tests: a CA, a
server certificate for the sampler (localhost, 127.0.0.1) and a client
certificate for Envoy (or any client), as PEM files in one folder."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issued = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer: Issued | None, *, ca: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[1].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())


def _write(path: Path, issued: Issued, *, with_key: bool = True) -> None:
    key, cert = issued
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if with_key:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        path.with_suffix(".key").write_bytes(pem)


def make_pki(directory: Path) -> Path:
    """``ca.crt``, ``sampler.crt``/``.key`` (server) and ``envoy.crt``/``.key`` (client) in ``directory``."""
    ca = _issue("mirror-sampler test CA", None, ca=True)
    _write(directory / "ca", ca, with_key=False)
    for name in ("sampler", "envoy"):
        _write(directory / name, _issue(name, ca))
    return directory

"""TLS for the asyncio transports: one ``ssl.SSLContext`` from the PEM paths in
MIRROR_TLS_CERT / MIRROR_TLS_KEY / MIRROR_TLS_CLIENT_CA.

ALPN offers only "h2": gRPC is HTTP/2, and RFC 9113 section 3.2 has TLS
clients select it by ALPN. A client CA turns on mutual TLS: a client without a
certificate signed by it fails the handshake.
"""

from __future__ import annotations

import ssl


def _readable(env: str, path: str) -> None:
    # ssl's own errors name neither the file nor the setting; reading first
    # lets the operator see which variable points at the wrong place.
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise OSError(f"{env}: cannot read {path}: {e.strerror or e}") from None


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """A server context for HTTP/2 over TLS 1.2+; ``client_ca`` requires client certificates."""
    _readable("MIRROR_TLS_CERT", cert)
    _readable("MIRROR_TLS_KEY", key)
    if client_ca:
        _readable("MIRROR_TLS_CLIENT_CA", client_ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # RFC 9113 section 9.2: TLS 1.2 or later, without renegotiation or compression.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise OSError(f"MIRROR_TLS_CERT/MIRROR_TLS_KEY: {cert} and {key} are not a matching PEM certificate and key: {e}") from None
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise OSError(f"MIRROR_TLS_CLIENT_CA: {client_ca} holds no usable PEM certificate: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx

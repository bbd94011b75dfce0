"""How ext_proc streams reach the servicer: two implementations, one contract.

- ``http2`` (the default): a minimal HTTP/2 server on ``asyncio.Protocol``,
  built for Envoy's one stream per request (docs/DESIGN.md, "The ext_proc
  stream"). Flat memory; a fraction of grpc.aio's CPU per request.
- ``grpcio``: grpc.aio, kept as the reference implementation. It leaks about
  110 bytes per stream Envoy resets (grpc/grpc issue 43360), and Envoy resets
  every stream.

Both serve ``Process`` and ``grpc.health.v1.Health`` (Check and Watch) on one
port, with the same settings, TLS and drain behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..health import Health
from ..servicer import Servicer

TRANSPORTS = ("http2", "grpcio")


class Transport(Protocol):
    async def start(self) -> int:
        """Listen; the bound port. OSError naming MIRROR_LISTEN if it cannot."""
        ...

    async def stop(self, grace: float) -> None:
        """Refuse new streams, give open ones ``grace`` seconds, then close."""
        ...


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths: serve TLS; with ``client_ca``, require client certificates."""

    cert: str
    key: str
    client_ca: str = ""


def create(
    name: str,
    servicer: Servicer,
    health: Health,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    tls: TlsFiles | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Transport:
    """The transport called ``name`` (one of TRANSPORTS), to listen on host:port."""
    if name == "grpcio":
        from .grpcio import GrpcioTransport

        return GrpcioTransport(servicer, health, host, port, reuse_port=reuse_port, tls=tls)
    if name != "http2":
        raise ValueError(f"unknown transport {name!r}; one of {', '.join(TRANSPORTS)}")
    from ..tls import server_ssl_context
    from .http2 import Http2Transport

    ssl = server_ssl_context(tls.cert, tls.key, tls.client_ca or None) if tls else None
    return Http2Transport(servicer, health, host, port, reuse_port=reuse_port, ssl=ssl, on_error=on_error)

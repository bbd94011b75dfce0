"""The grpc.aio transport: the reference implementation of the contract.

Kept because grpcio is the gRPC most people trust; not the default because
grpc.aio leaks about 110 bytes per cancelled call (grpc/grpc issue 43360) and
Envoy ends every ext_proc stream with RST_STREAM, which grpc.aio sees as a
cancelled call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc

from ...config.addresses import join_address
from ...wire import PROCESS_METHOD, RULE_METADATA, SERVICE_NAME
from ..health import Health
from ..servicer import Servicer
from ..tls import server_ssl_context
from . import TlsFiles


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS, mutual when ``tls.client_ca`` is set.

    The files are checked first as the http2 transport checks them (one
    ``ssl`` context, thrown away): grpc's own failure, at ``add_secure_port``,
    names neither the file nor the setting."""
    server_ssl_context(tls.cert, tls.key, tls.client_ca or None)
    files = {}
    for env, path in (("MIRROR_TLS_CERT", tls.cert), ("MIRROR_TLS_KEY", tls.key), ("MIRROR_TLS_CLIENT_CA", tls.client_ca)):
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                files[env] = f.read()
        except OSError as e:
            raise OSError(f"{env}: cannot read {path}: {e.strerror}") from None
    ca = files.get("MIRROR_TLS_CLIENT_CA")
    return grpc.ssl_server_credentials(
        [(files["MIRROR_TLS_KEY"], files["MIRROR_TLS_CERT"])], root_certificates=ca, require_client_auth=ca is not None
    )


def _rule_id(context: grpc.aio.ServicerContext[bytes, bytes]) -> str | None:
    """The rule id Envoy's route put on this stream (RULE_METADATA), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == RULE_METADATA:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class GrpcioTransport:
    def __init__(self, servicer: Servicer, health: Health, host: str, port: int, *, reuse_port: bool, tls: TlsFiles | None) -> None:
        self.tls = tls
        self.servicer = servicer
        self.health = health
        self.address = join_address(host, port)
        self.reuse_port = reuse_port
        self.server: grpc.aio.Server | None = None
        self.health_servicer = grpc_health.aio.HealthServicer()
        self._unsubscribe = health.subscribe(self._health_changed)

    async def process(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        stream = self.servicer.open_stream(_rule_id(context))
        try:
            async for data in requests:
                try:
                    answer = stream.message(data)
                except Exception:  # as the http2 transport: this stream ends, INTERNAL
                    await context.abort(grpc.StatusCode.INTERNAL, "the processor failed")
                if answer is not None:
                    yield answer
        finally:
            stream.close()

    async def _copy_health(self) -> None:
        for service in ("", SERVICE_NAME):
            status = self.health.status(service)
            if status is not None:
                await self.health_servicer.set(service, status)

    def _health_changed(self) -> None:
        asyncio.get_running_loop().create_task(self._copy_health())

    async def start(self) -> int:
        credentials = None if self.tls is None else server_credentials(self.tls)  # OSError naming the setting
        # SO_REUSEPORT off for a single process: a second sampler on a busy
        # port must fail loudly, not silently split Envoy's streams with a
        # stale process. Workers share the port on purpose (server.workers).
        server = self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if self.reuse_port else 0)])
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                PROCESS_METHOD.rsplit("/", 1)[1]: grpc.stream_stream_rpc_method_handler(
                    self.process,
                    # The servicer parses and serialises: bytes both ways.
                    request_deserializer=None,
                    response_serializer=None,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        try:
            port = server.add_insecure_port(self.address) if credentials is None else server.add_secure_port(self.address, credentials)
        except RuntimeError as e:
            raise OSError(f"MIRROR_LISTEN: cannot listen on {self.address}: {e}") from None
        await server.start()
        await self._copy_health()
        return int(port)

    async def stop(self, grace: float) -> None:
        self._unsubscribe()
        if self.server is not None:
            # stop() refuses new streams at once and gives open ones the grace.
            await self.server.stop(grace)

"""The gRPC server's lifecycle: health, metrics port, signals, reload, drain."""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from . import logs
from .config import Settings, split_address
from .metrics import Metrics
from .service import ExternalProcessor, generic_handler
from .store import PolicyStore
from .wire import SERVICE_NAME



def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (mutual when MIRROR_TLS_CLIENT_CA is set), or None for plaintext."""
    if not settings.tls_cert:
        return None
    files = {}
    for env, path in (("MIRROR_TLS_CERT", settings.tls_cert), ("MIRROR_TLS_KEY", settings.tls_key), ("MIRROR_TLS_CLIENT_CA", settings.tls_client_ca)):
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


STALL_SECONDS = 0.2  # Envoy's default message_timeout in the generated config


async def watch_loop_lag(metrics: Metrics, stop: asyncio.Event, interval: float = 0.05) -> None:
    """Measure how late the loop wakes from a short sleep. The sampler cannot
    see the streams Envoy abandons while it is stalled, but it can see the stall."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - started - interval)
        metrics.loop_lag.observe(lag)
        if lag > STALL_SECONDS:
            metrics.stalls.inc()


class Server:
    """One sampler process. ``serve()`` returns after a graceful shutdown."""

    def __init__(
        self,
        settings: Settings,
        store: PolicyStore | None = None,
        metrics: Metrics | None = None,
        *,
        worker: int | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """``worker``: this process's index under a supervisor (``workers``);
        ``on_ready`` runs once the port serves (the supervisor's start signal)."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.worker = worker
        self.on_ready = on_ready
        self.log = logs.get("mirror_sampler") if worker is None else logs.get("mirror_sampler").bind(worker=worker)
        # Raises ConfigError before anything listens: bad input fails start-up.
        self.store = store or PolicyStore(settings, self.metrics, self.log)
        self.stop_requested = asyncio.Event()
        self.port: int | None = None

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def serve(self) -> None:
        settings = self.settings
        # SO_REUSEPORT off for a single process: a second sampler on a busy
        # port must fail loudly, not silently split Envoy's streams with a
        # stale process. Workers share the port on purpose; their supervisor
        # checked that it was free and holds it (workers.py).
        reuse = 1 if self.worker is not None else 0
        server = grpc.aio.server(options=[("grpc.so_reuseport", reuse)])
        server.add_generic_rpc_handlers((generic_handler(ExternalProcessor(self.store.responder, self.metrics)),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        host, port = split_address(settings.listen)
        address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise OSError(f"MIRROR_LISTEN: cannot listen on {settings.listen}: {e}") from None
        metrics_server = None
        if settings.metrics_listen:
            m_host, m_port = split_address(settings.metrics_listen)
            try:
                metrics_server, _ = start_http_server(m_port, addr=m_host, registry=self.metrics.registry)
            except OSError as e:
                raise OSError(f"MIRROR_METRICS_LISTEN: cannot listen on {settings.metrics_listen}: {e}") from None
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.store.reload("SIGHUP"))
        watcher = asyncio.create_task(self.store.watch(self.stop_requested))
        lag_probe = asyncio.create_task(watch_loop_lag(self.metrics, self.stop_requested))
        # Start-up objects (config, protobuf descriptors, Envoy-config
        # helpers) never die: keep them out of every collection.
        gc.collect()
        gc.freeze()
        if self.on_ready is not None:
            self.on_ready()
        self.log.info(
            "serving",
            port=self.port,
            metrics_port=metrics_server.server_port if metrics_server else None,
            rules=len(self.store.policy.rules),
            **settings.effective(),
        )
        try:
            await self.stop_requested.wait()
        finally:
            self.log.info("draining", drain_delay=settings.drain_delay, grace_seconds=settings.shutdown_grace)
            # NOT_SERVING first, still serving for the drain delay, so Envoys
            # that health-check move to other samplers before streams are refused.
            await health_servicer.enter_graceful_shutdown()
            await asyncio.sleep(settings.drain_delay)
            # stop() refuses new streams at once and gives open ones the grace.
            await server.stop(settings.shutdown_grace)
            watcher.cancel()
            lag_probe.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            self.log.info("stopped")

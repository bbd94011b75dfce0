"""One sampler process: transport, health, metrics port, signals, reload, drain."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable

from prometheus_client import start_http_server

from ..config.addresses import split_address
from ..config.settings import Settings
from ..watch import AsyncDriver
from . import logs, transports
from .health import Health
from .metrics import Metrics
from .servicer import Servicer
from .store import PolicyStore

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
        self.health = Health(serving=False)
        self.stop_requested = asyncio.Event()
        # File events and SIGHUP: reloads in a thread, one at a time, the last content read in force.
        self.reloads = AsyncDriver(self.store.source, seen=self.store.folder_changed)
        self.port: int | None = None

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def serve(self) -> None:
        settings = self.settings
        servicer = Servicer(self.store.plan, self.metrics)
        host, port = split_address(settings.listen)
        transport = transports.create(
            settings.transport,
            servicer,
            self.health,
            host,
            port,
            # SO_REUSEPORT off for a single process: a second sampler on a
            # busy port must fail loudly, not silently split Envoy's streams
            # with a stale process. Workers share the port on purpose.
            reuse_port=self.worker is not None,
            tls=transports.TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None,
            on_error=self.metrics.error,
        )
        self.port = await transport.start()
        self.metrics.set_build(settings.transport, "routes" if settings.config else "simple")
        metrics_server = None
        if settings.metrics_listen:
            m_host, m_port = split_address(settings.metrics_listen)
            try:
                metrics_server, _ = start_http_server(m_port, addr=m_host, registry=self.metrics.registry)
            except OSError as e:
                await transport.stop(0)
                raise OSError(f"MIRROR_METRICS_LISTEN: cannot listen on {settings.metrics_listen}: {e}") from None
        self.health.set_all(True)

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reloads.request, "SIGHUP")
        # In place before the sampler says it serves: an edit made from then on is seen.
        watcher = await self.reloads.start(self.stop_requested)
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
            self.health.set_all(False)
            await asyncio.sleep(settings.drain_delay)
            self.log.info("refusing_new_streams", grace_seconds=settings.shutdown_grace)
            await transport.stop(settings.shutdown_grace)
            watcher.cancel()
            lag_probe.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            self.log.info("stopped")

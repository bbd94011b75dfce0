"""The observer: the gRPC ext_proc service Envoy's capture filters stream
responses to (observability mode: Envoy never waits for it).

Each stream becomes one Capture; the stream is ended as soon as the response
is complete (or its body passed the bound), so Envoy frees it at once and
sends no more. Captures go through a bounded queue to one writer thread that
stores and joins them: a slow disk drops captures (counted), it never holds
a stream or Envoy.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from google.protobuf.message import DecodeError

from ..config.errors import ConfigError
from ..config.source import ConfigFile, ConfigSource
from ..watch import AsyncDriver
from ..wire import SERVICE_NAME, HttpHeaders, ProcessingRequest
from .config import CompareConfig
from .judge import Comparison
from .metrics import CompareMetrics
from .records import CAPTURE_METADATA, Capture, CaptureAssembler, CaptureTag, TagError
from .store import CompareStore

log = structlog.get_logger("mirror_sampler.compare")
QUEUE_BOUND = 10_000
SWEEP_EVERY_S = 1.0


def _tag(context: grpc.aio.ServicerContext[bytes, bytes]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == CAPTURE_METADATA:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _headers(message: HttpHeaders) -> list[tuple[str, str]]:
    return [(h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in message.headers.headers]


@dataclass
class Writer:
    """One thread that stores captures and sweeps; fed by a bounded queue."""

    store_factory: Callable[[], CompareStore]
    metrics: CompareMetrics
    clock: Callable[[], float] = time.time
    bound: int = QUEUE_BOUND
    # Replaced by a live edit; the writer's store judges with it from its next batch.
    config: CompareConfig | None = None

    def __post_init__(self) -> None:
        self.queue: queue.Queue[Capture | None] = queue.Queue(maxsize=self.bound)
        self.thread = threading.Thread(target=self._run, name="compare-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def offer(self, capture: Capture) -> None:
        try:
            self.queue.put_nowait(capture)
        except queue.Full:
            self.metrics.dropped("queue_full")

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        store = self.store_factory()
        next_sweep = self.clock() + SWEEP_EVERY_S
        try:
            while True:
                batch, stopping = self._take()
                if self.config is not None:
                    store.config = self.config
                self._store(store, batch)
                if stopping:
                    return
                if self.clock() >= next_sweep:
                    next_sweep = self.clock() + SWEEP_EVERY_S
                    self._record(store.sweep(self.clock()))
                    if store.dropped_by_last_sweep:
                        self.metrics.dropped("pending_over_bound", store.dropped_by_last_sweep)
        finally:
            store.close()

    def _take(self) -> tuple[list[Capture], bool]:
        """What is queued (waiting up to a sweep interval for the first), and whether to stop."""
        batch: list[Capture] = []
        try:
            item = self.queue.get(timeout=SWEEP_EVERY_S)
            while True:
                if item is None:
                    return batch, True
                batch.append(item)
                if len(batch) >= 500:
                    return batch, False
                item = self.queue.get_nowait()
        except queue.Empty:
            return batch, False

    def _store(self, store: CompareStore, batch: list[Capture]) -> None:
        if not batch:
            return
        try:
            self._record(store.add(batch))
        except Exception:
            log.exception("compare_store_failed", captures=len(batch))
            self.metrics.dropped("store_failed", len(batch))

    def _record(self, comparisons: list[Comparison]) -> None:
        for c in comparisons:
            self.metrics.compared(c)


class CaptureService:
    def __init__(self, config: CompareConfig, writer: Writer, metrics: CompareMetrics) -> None:
        self.config = config
        self.writer = writer
        self.metrics = metrics

    async def process(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        """Reads one stream; answers nothing (observability mode: Envoy would ignore it)."""
        try:
            tag = CaptureTag.decode(_tag(context))
        except TagError as e:
            self.metrics.dropped("bad_tag")
            log.warning("compare_bad_stream", error=str(e))
            return
        assembler = CaptureAssembler(tag, self.config.body_limit, self.config.private_headers)
        async for data in requests:
            try:
                message = ProcessingRequest.FromString(data)
            except DecodeError:  # not a ProcessingRequest: end this stream only
                self.metrics.dropped("malformed_message")
                return
            kind = message.WhichOneof("request")
            done: Capture | None = None
            if kind == "request_headers":
                assembler.request_headers(_headers(message.request_headers), time.monotonic())
            elif kind == "response_headers":
                done = assembler.response_headers(
                    _headers(message.response_headers), message.response_headers.end_of_stream, time.monotonic(), time.time()
                )
            elif kind == "response_body":
                done = assembler.response_body(message.response_body.body, message.response_body.end_of_stream, time.time())
            if done is not None:
                self.writer.offer(done)
                return  # ends the stream: Envoy sends no more
        if assembler.complete is None:
            self.metrics.dropped("incomplete_stream")


@dataclass
class ObserverSettings:
    """What ``serve`` needs; ``parse`` reads a new content of the settings
    file (ConfigError when it is wrong), ``watched`` is that file (None:
    nothing to watch), ``built_from`` the text ``config`` was parsed from (an
    edit made before the watch starts must not pass for it)."""

    host: str
    port: int
    config: CompareConfig
    store_path: str
    parse: Callable[[str], CompareConfig] | None = None
    watched: str | None = None
    built_from: str | None = None


@dataclass(frozen=True)
class _SettingsFile:
    config: str


def _read(file: ConfigFile) -> str | None:
    try:
        return Path(file.config).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"--config {file.config}: cannot read: {e}"]) from None


class _Reloads:
    """The settings file's judge (``config.source``): a valid edit applies to
    what is captured and judged next; an invalid one is logged and counted,
    the settings in force stay. (Which rules and targets Envoy captures is
    Envoy's configuration.)"""

    def __init__(self, parse: Callable[[str], CompareConfig], apply: Callable[[CompareConfig], None], metrics: CompareMetrics) -> None:
        self.parse = parse
        self.apply = apply
        self.metrics = metrics

    def judge(self, text: str | None, reason: str) -> None:
        config = self.parse(text or "")
        self.apply(config)
        self.metrics.reload("ok")
        log.info("compare_reloaded", rules=sorted(config.rules), reason=reason)

    def unchanged(self, reason: str) -> None:
        pass

    # Logged, then counted: whoever sees the count can find the reason.
    def rejected(self, reason: str, problems: list[str]) -> None:
        log.warning("compare_reload_refused", problems=problems, reason=reason)
        self.metrics.reload("invalid")

    def failed(self, reason: str, error: Exception) -> None:
        log.error("compare_reload_failed", error=repr(error), reason=reason)
        self.metrics.reload("invalid")


async def watch(settings: ObserverSettings, apply: Callable[[CompareConfig], None], metrics: CompareMetrics, stop: asyncio.Event) -> None:
    """Reloads the settings file through the one configuration source."""
    if settings.watched is None or settings.parse is None:
        return
    file = _SettingsFile(str(Path(settings.watched).absolute()))
    source = ConfigSource(file, _Reloads(settings.parse, apply, metrics), settings.built_from, read=_read)
    await AsyncDriver(source).watch(stop)


async def serve(settings: ObserverSettings, metrics: CompareMetrics, ready: Callable[[int], None]) -> None:
    host, port, config, store_path = settings.host, settings.port, settings.config, settings.store_path
    writer = Writer(lambda: CompareStore(store_path, config), metrics)
    writer.start()
    service = CaptureService(config, writer, metrics)

    def apply(new: CompareConfig) -> None:
        service.config = new
        writer.config = new

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {"Process": grpc.stream_stream_rpc_method_handler(service.process)})
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(watch(settings, apply, metrics, stop))
    await stop.wait()
    await server.stop(grace=2)
    await watcher
    writer.stop()

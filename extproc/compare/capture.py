"""The observer: the ext_proc service Envoy's capture filters stream
responses to (observability mode: Envoy never waits for it), on the
project's own HTTP/2 transport (extproc/server/transports/http2).

Each stream becomes one Capture; the stream is ended as soon as the response
is complete (or its body passed the bound), so Envoy frees it at once and
sends no more. Captures go through a bounded queue to one writer thread that
stores and joins them a batch at a time: a slow disk drops captures
(counted), it never holds a stream or Envoy.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from ..config.errors import ConfigError
from ..config.source import ConfigFile, ConfigSource
from ..server.health import Health
from ..server.transports.http2 import FINISHED, Http2Transport
from ..watch import AsyncDriver
from ..wire import HttpHeaders, ProcessingRequest
from .config import CompareConfig
from .judge import Comparison
from .metrics import CompareMetrics
from .records import CAPTURE_METADATA, Capture, CaptureAssembler, CaptureTag, TagError
from .store import CompareStore

log = structlog.get_logger("mirror_sampler.compare")
QUEUE_BOUND = 10_000
# And in bytes: 10,000 captures of a 64 KiB body would be 640 MiB.
QUEUE_BYTES = 64 * 2**20
SWEEP_EVERY_S = 1.0
# Captures that arrive within this long of a batch's first are stored in its
# transaction: one SQLite transaction per batch, not per capture (a request's
# sides, answered within milliseconds, usually share one).
BATCH_WINDOW_S = 0.1
BATCH_MAX = 500
# Open streams are given this long to finish at SIGTERM.
STOP_GRACE_S = 2.0


# Envoy's routes send a handful of distinct tags: each is parsed once. (A bad
# one raises each time, so it is never cached.)
_tag = lru_cache(maxsize=256)(CaptureTag.decode)


def _headers(message: HttpHeaders) -> list[tuple[str, str]]:
    return [(h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in message.headers.headers]


@dataclass
class Writer:
    """One thread that stores captures and sweeps; fed by a queue bounded in
    captures and in bytes. The bytes count a capture from its offer until its
    batch is stored, so the queue and the batch in hand hold at most
    ``byte_bound`` (a capture larger than that still enters when nothing is
    held: the bound is ``byte_bound`` plus one body)."""

    store_factory: Callable[[], CompareStore]
    metrics: CompareMetrics
    clock: Callable[[], float] = time.time
    bound: int = QUEUE_BOUND
    byte_bound: int = QUEUE_BYTES
    window: float = BATCH_WINDOW_S
    # Replaced by a live edit; the writer's store judges with it from its next batch.
    config: CompareConfig | None = None

    def __post_init__(self) -> None:
        self.queue: queue.Queue[Capture | None] = queue.Queue(maxsize=self.bound)
        self.thread = threading.Thread(target=self._run, name="compare-writer", daemon=True)
        # Bytes offered and not yet stored (the event loop adds, the writer subtracts).
        self.queued_bytes = 0
        self._bytes_lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def offer(self, capture: Capture) -> None:
        weight = capture.weight
        with self._bytes_lock:
            if self.queued_bytes and self.queued_bytes + weight > self.byte_bound:
                self.metrics.dropped("queue_full")
                return
            try:
                self.queue.put_nowait(capture)
            except queue.Full:
                self.metrics.dropped("queue_full")
                return
            self.queued_bytes += weight

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
                with self._bytes_lock:
                    self.queued_bytes -= sum(c.weight for c in batch)
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
        """What is queued (waiting up to a sweep interval for the first, then a
        batch window for more), and whether to stop."""
        batch: list[Capture] = []
        try:
            item = self.queue.get(timeout=SWEEP_EVERY_S)
        except queue.Empty:
            return batch, False
        if item is not None:
            # One wait for the whole batch, not a wake-up per capture.
            time.sleep(self.window)
        try:
            while True:
                if item is None:
                    return batch, True
                batch.append(item)
                if len(batch) >= BATCH_MAX:
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


class CaptureStream:
    """One capture stream: the transport's ``ProcessStreamLike``. Answers
    nothing (observability mode: Envoy would ignore it); ``FINISHED`` once it
    has seen all it wants, which ends the stream."""

    __slots__ = ("service", "assembler", "ended")

    def __init__(self, service: CaptureService, assembler: CaptureAssembler | None) -> None:
        self.service = service
        self.assembler = assembler  # None: the stream's tag was refused (counted)
        self.ended = assembler is None  # counted or captured: its close counts nothing more

    def message(self, data: bytes) -> bytes | None:
        assembler = self.assembler
        if assembler is None:
            return FINISHED
        try:
            message = ProcessingRequest.FromString(data)
        except DecodeError:  # not a ProcessingRequest: end this stream only
            self.service.metrics.dropped("malformed_message")
            self.ended = True
            return FINISHED
        kind = message.WhichOneof("request")
        done: Capture | None = None
        if kind == "request_headers":
            assembler.request_headers(_headers(message.request_headers), time.monotonic())
        elif kind == "response_headers":
            headers = message.response_headers
            done = assembler.response_headers(_headers(headers), headers.end_of_stream, time.monotonic(), time.time())
        elif kind == "response_body":
            body = message.response_body
            done = assembler.response_body(body.body, body.end_of_stream, time.time())
        if done is None:
            return None
        self.ended = True
        self.service.writer.offer(done)
        return FINISHED  # Envoy frees the stream and sends no more

    def close(self) -> None:
        if not self.ended:
            # Reset, cut or ended by Envoy before its response was complete.
            self.ended = True
            self.service.metrics.dropped("incomplete_stream")


class CaptureService:
    """The transport's servicer: a stream per capture, told who it observes by
    the ``CAPTURE_METADATA`` its route set."""

    def __init__(self, config: CompareConfig, writer: Writer, metrics: CompareMetrics) -> None:
        self.config = config
        self.writer = writer
        self.metrics = metrics

    def open_stream(self, metadata: str | None, /) -> CaptureStream:
        try:
            tag = _tag(metadata)
        except TagError as e:
            self.metrics.dropped("bad_tag")
            log.warning("compare_bad_stream", error=str(e))
            return CaptureStream(self, None)
        config = self.config
        return CaptureStream(self, CaptureAssembler(tag, config.body_limit, config.private_headers))


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

    health = Health()
    # reuse_port: observers may share one address (the kernel spreads Envoy's connections).
    transport = Http2Transport(
        service, health, host, port, reuse_port=True, on_error=metrics.transport_error, metadata_key=CAPTURE_METADATA
    )
    try:
        bound = await transport.start()
    except BaseException:
        writer.stop()
        raise
    ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(watch(settings, apply, metrics, stop))
    await stop.wait()
    health.set_all(False)
    await transport.stop(STOP_GRACE_S)
    await watcher
    writer.stop()

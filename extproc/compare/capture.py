"""The observer: Envoy's gRPC access log service (StreamAccessLogs), on the
project's own HTTP/2 transport (extproc/server/transports/http2).

Envoy's capture filter (Lua) copies each captured side's response into the
request's dynamic metadata; the gRPC access logger, which logs only the
requests that carry a capture tag, sends their entries in batches on one
long-lived stream per Envoy worker (Envoy never waits for the observer, and
ignores its answer). Each entry becomes one Capture (entries.py); an entry
that cannot be one is counted and skipped, a message that is not a
StreamAccessLogsMessage is counted and skipped: neither ends the stream.
Captures go through a bounded queue to one writer thread that stores and
joins them a batch at a time: a slow disk drops captures (counted), it never
holds a stream or Envoy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from ..config.source import ConfigFile, ConfigSource, read_config_file
from ..server.health import Health
from ..server.transports.http2 import Http2Transport
from ..watch import AsyncDriver
from ..wire import ACCESS_LOG_METHOD
from ..wire.accesslog_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse
from .config import CompareConfig
from .entries import MALFORMED_ENTRY, EntryError, entry_capture, read_entry
from .judge import Comparison
from .metrics import CompareMetrics
from .records import Capture
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
# Open streams are given this long to finish at SIGTERM (Envoy's access log
# streams never finish by themselves: they are closed after it).
STOP_GRACE_S = 2.0
# The one answer of a StreamAccessLogs call, sent when Envoy ends its stream.
ACCESS_LOG_ANSWER = StreamAccessLogsResponse().SerializeToString()


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
    pause: Callable[[float], None] = time.sleep
    # Replaced by a live edit; the writer's store judges with it from its next batch.
    config: CompareConfig | None = None

    def __post_init__(self) -> None:
        self.queue: queue.Queue[Capture | None] = queue.Queue(maxsize=self.bound)
        self.thread = threading.Thread(target=self._run, name="compare-writer", daemon=True)
        # Bytes offered and not yet stored (the event loop adds, the writer subtracts).
        self.queued_bytes = 0
        self._bytes_lock = threading.Lock()
        # Unlisted rules already named in the log, under the settings in force.
        self._named_unlisted: set[str] = set()
        # The store could not be opened: the writer is gone.
        self.unavailable = False

    def start(self) -> None:
        self.thread.start()

    def offer(self, capture: Capture) -> None:
        if self.unavailable:
            self.metrics.dropped("store_failed")
            return
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
        try:
            store = self.store_factory()
        except Exception:
            # The CLI opened the file before serving; it went away since. Every capture is now counted as dropped.
            log.exception("compare_store_unavailable")
            self.unavailable = True
            return
        next_sweep = self.clock() + SWEEP_EVERY_S
        try:
            while True:
                batch, stopping = self._take()
                if self.config is not None and self.config is not store.config:
                    store.reconfigure(self.config, self.clock())
                    self._named_unlisted.clear()
                self._store(store, batch)
                with self._bytes_lock:
                    self.queued_bytes -= sum(c.weight for c in batch)
                if stopping:
                    return
                if self.clock() >= next_sweep:
                    next_sweep = self.clock() + SWEEP_EVERY_S
                    self._sweep(store)
        finally:
            store.close()

    def _sweep(self, store: CompareStore) -> None:
        # A sweep that fails (the file locked past the timeout, the disk full)
        # is rolled back and tried again at the next; it never ends the writer.
        try:
            comparisons = store.sweep(self.clock())
        except Exception:
            log.exception("compare_sweep_failed")
            return
        self._record(comparisons)
        self._counted(store)

    def _counted(self, store: CompareStore) -> None:
        """What the store's last call dropped, counted; the groups it could not judge, logged (the first, and how many)."""
        for reason, count in store.dropped_by_last_call.items():
            self.metrics.dropped(reason, count)
        failures = store.failures_of_last_call
        if failures:
            log.error("compare_groups_not_judged", groups=len(failures), first=repr(failures[0]))

    def _take(self) -> tuple[list[Capture], bool]:
        """What is queued (waiting up to a sweep interval for the first, then a
        batch window for more), and whether to stop."""
        batch: list[Capture] = []
        try:
            item = self.queue.get(timeout=SWEEP_EVERY_S)
        except queue.Empty:
            return batch, False
        if item is not None:
            # One wait for the whole batch, not a wake-up per capture; also with
            # a backlog, on purpose: this pause caps the writer (about BATCH_MAX
            # captures a window) and so its CPU beside Envoy's under saturation,
            # where what comes faster is dropped and counted. Taking a backlog
            # at once compared everything and cost Envoy 12% of its throughput
            # (docs/compare.md "Drops under saturation").
            self.pause(self.window)
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
        batch = self._listed(store, batch)
        if not batch:
            return
        try:
            self._record(store.add(batch))
        except Exception:
            log.exception("compare_store_failed", captures=len(batch))
            self.metrics.dropped("store_failed", len(batch))
        else:
            self._counted(store)

    def _listed(self, store: CompareStore, batch: list[Capture]) -> list[Capture]:
        """The batch's captures of listed rules, each naming only listed targets.

        An Envoy rendered from older settings than the observer's captures a
        rule or a target no longer listed: judged with defaults (no ignore
        rules, no secondary), they would be stored as differences nobody asked
        for; and a target name is a label of the metrics, which a capture must
        not make grow."""
        now = self.clock()
        kept: list[Capture] = []
        unlisted: set[str] = set()
        for capture in batch:
            listed = store.listed_targets(capture.rule, now)
            if listed is None:
                kept.append(capture)
            elif not listed:
                self.metrics.dropped("unlisted_rule")
                unlisted.add(capture.rule)
            else:
                targets = tuple(t for t in capture.targets if t in listed)
                if not targets:
                    self.metrics.dropped("unlisted_target")
                else:
                    kept.append(capture if targets == capture.targets else dataclasses.replace(capture, targets=targets))
        # Named once per rule and settings: the count says how many, this says which rule to fix.
        for rule in sorted(unlisted - self._named_unlisted):
            log.warning("compare_rule_not_listed", rule=rule, hint="Envoy captures a rule the --config file does not list: render it again")
            self._named_unlisted.add(rule)
        return kept

    def _record(self, comparisons: list[Comparison]) -> None:
        for c in comparisons:
            self.metrics.compared(c)


class AccessLogStream:
    """One Envoy worker's access log stream: the transport's ``ProcessStreamLike``.
    Answers nothing per message (the transport sends the call's one empty
    response when Envoy ends the stream); each entry becomes a capture or a
    counted drop."""

    __slots__ = ("service",)

    def __init__(self, service: CaptureService) -> None:
        self.service = service

    def message(self, data: bytes) -> bytes | None:
        service = self.service
        try:
            message = StreamAccessLogsMessage.FromString(data)
        except DecodeError:  # not a StreamAccessLogsMessage: this message only
            service.metrics.dropped("malformed_message")
            return None
        config = service.config
        wall = time.time()
        for entry in message.http_logs.log_entry:
            try:
                capture = entry_capture(read_entry(entry), config.body_limit, config.private_headers, wall)
            except EntryError as e:
                service.metrics.dropped(e.reason)
                service.refused(e)
                continue
            except Exception as e:
                # Not foreseen by entry_capture: this entry only, counted, and the message goes on.
                service.metrics.dropped(MALFORMED_ENTRY)
                service.refused(EntryError(MALFORMED_ENTRY, f"cannot read the entry: {type(e).__name__}"))
                continue
            service.writer.offer(capture)
        return None

    def close(self) -> None:
        pass  # every entry was taken as its message came: an ended stream loses nothing


class CaptureService:
    """The transport's servicer: a stream per Envoy worker's access logger."""

    # Refused entries are logged at most this often (they are counted always).
    LOG_EVERY_S = 10.0

    def __init__(self, config: CompareConfig, writer: Writer, metrics: CompareMetrics) -> None:
        self.config = config
        self.writer = writer
        self.metrics = metrics
        self._logged_at: float | None = None

    def open_stream(self, metadata: str | None, /) -> AccessLogStream:
        return AccessLogStream(self)

    def refused(self, error: EntryError) -> None:
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.LOG_EVERY_S:
            self._logged_at = now
            log.warning("compare_entry_refused", reason=error.reason, error=str(error))


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
    return read_config_file(file.config, "--config")


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


async def watch(
    settings: ObserverSettings, apply: Callable[[CompareConfig], None], metrics: CompareMetrics, stop: asyncio.Event
) -> asyncio.Task[None] | None:
    """Reloads the settings file through the one configuration source: the
    watch as a task, once it is in place (None without a file)."""
    if settings.watched is None or settings.parse is None:
        return None
    file = _SettingsFile(str(Path(settings.watched).absolute()))
    source = ConfigSource(file, _Reloads(settings.parse, apply, metrics), settings.built_from, read=_read)
    return await AsyncDriver(source).start(stop)


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
        service,
        health,
        host,
        port,
        reuse_port=True,
        on_error=metrics.transport_error,
        method=ACCESS_LOG_METHOD,
        closing_answer=ACCESS_LOG_ANSWER,
    )
    try:
        bound = await transport.start()
    except BaseException:
        writer.stop()
        raise
    stop = asyncio.Event()
    # In place before the observer says it serves: an edit made from then on is seen.
    watcher = await watch(settings, apply, metrics, stop)
    ready(bound)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    health.set_all(False)
    await transport.stop(STOP_GRACE_S)
    if watcher is not None:
        await watcher
    writer.stop()

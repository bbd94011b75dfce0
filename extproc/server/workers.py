"""`serve` with ``MIRROR_WORKERS=N``: N sampler processes sharing one port.

One worker (the default) is the plain server in this process. With N > 1 this
process becomes a supervisor that:

- checks the port the way a single server would (a plain bind, without
  SO_REUSEPORT, so a busy port fails loudly with the same message), then holds
  it with a bound, non-listening SO_REUSEPORT socket: the kernel hands
  connections only to listening sockets, so the holder takes none, but nothing
  without SO_REUSEPORT can take the port while the workers restart;
- forks the workers before any gRPC state exists in this process (a gRPC
  server must be created after fork); each runs ``Server`` with
  ``grpc.so_reuseport`` on, its own event loop, file watcher and health
  service, and its own metrics port (``MIRROR_METRICS_LISTEN`` port + index);
- restarts a worker that dies (with a back-off when one keeps dying), and
  fails start-up if a worker cannot get ready at all (a bad metrics port);
- forwards SIGHUP (reload; each worker also watches the file itself) and
  SIGTERM/SIGINT (each worker drains as a single server does), and exits once
  every worker has stopped.

The kernel spreads Envoy's connections over the workers (SO_REUSEPORT hashes
each connection to one listener); Envoy keeps a few HTTP/2 connections per
worker thread, so streams spread with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace

from ..config.addresses import join_address, split_address
from ..config.settings import Settings
from ..lifetime import die_with_parent
from . import logs
from .ports import family, probe_free

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
READY_TIMEOUT = 30.0
# A worker that dies within this many seconds of its start counts as crashing
# at start; its restarts back off, up to MAX_BACKOFF seconds apart.
FLAPPING = 5.0
MAX_BACKOFF = 10.0


def serve(settings: Settings) -> int:
    """Run `serve` with ``settings.workers`` processes; the exit code.

    Raises ConfigError for bad configuration (before anything listens) and
    OSError naming the setting for a port that is not free, as one server does.
    """
    if settings.workers <= 1:
        from .lifecycle import Server

        asyncio.run(Server(settings).serve())
        return 0
    return Supervisor(settings).run()


def hold_port(address: str) -> tuple[socket.socket, int]:
    """Check that ``address`` is free and hold it for SO_REUSEPORT workers.

    Returns the holding socket (bound, never listening) and the port (the
    kernel's choice for port 0).
    """
    host, port = split_address(address)
    try:
        port = probe_free(host, port)
        holder = socket.socket(family(host), socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
    except OSError as e:
        raise OSError(f"MIRROR_LISTEN: cannot listen on {address}: {e.strerror or e}") from None
    return holder, port


def _metrics_listen(settings: Settings, index: int) -> str:
    """Worker ``index``'s metrics address: the configured port + index (0 stays 0)."""
    if not settings.metrics_listen:
        return settings.metrics_listen
    host, port = split_address(settings.metrics_listen)
    return join_address(host, port + index if port else 0)


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    failures: int = 0  # consecutive deaths soon after start
    restarts: int = 0
    restart_at: float | None = None
    ready_fd: int | None = None


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log = logs.get("mirror_sampler").bind(role="supervisor")
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.stopping = False
        self.holder: socket.socket | None = None
        self.port = 0

    # -- the supervisor's loop ----------------------------------------------

    def run(self) -> int:
        # Bad configuration fails here, once, with every problem listed,
        # rather than in N workers.
        from ..config.source import load_policy

        load_policy(self.settings)
        self.holder, self.port = hold_port(self.settings.listen)
        host, _ = split_address(self.settings.listen)
        self.worker_settings = replace(self.settings, listen=join_address(host, self.port))
        # N processes share stdout/stderr: each log line must reach the file
        # in one write(2), also under `python -u` (print writes the message
        # and the newline separately).
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True, write_through=False)
        # Signals wait in sigtimedwait, never interrupt a fork.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for w in self.workers:
                self._start(w)
            self._wait_all_ready()
            self.log.info("supervising", port=self.port, workers=len(self.workers), pids=[w.pid for w in self.workers])
            self._loop()
        finally:
            self._stop_all(force=True)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            if self.holder is not None:
                self.holder.close()
        self.log.info("stopped")
        return 0

    def _wait_all_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers):
            self._poll_ready()
            for pid, status in self._reap():
                w = self._by_pid(pid)
                if w is not None:
                    w.pid = 0
                    raise OSError(f"worker {w.index} exited during start-up ({_describe(status)}); see its log lines above")
            if time.monotonic() > deadline:
                raise OSError(f"workers not ready within {READY_TIMEOUT:.0f}s")
            info = signal.sigtimedwait([signal.SIGCHLD, signal.SIGTERM, signal.SIGINT], 0.05)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self._begin_stop(info.si_signo)
                return

    def _begin_stop(self, sig: int) -> None:
        self.log.info("forwarding", signal=signal.Signals(sig).name, workers=len(self.workers))
        self.stopping = True
        self._stop_deadline = time.monotonic() + self.settings.drain_delay + self.settings.shutdown_grace + 10
        for w in self.workers:
            w.restart_at = None
        self._signal_all(signal.SIGTERM)

    def _loop(self) -> None:
        while True:
            self._poll_ready()
            for pid, status in self._reap():
                self._exited(pid, status)
            if self.stopping:
                if not any(w.pid for w in self.workers):
                    return
                if time.monotonic() > self._stop_deadline:
                    self.log.warning("workers_killed", reason="did not stop in time")
                    return
            timeout = 1.0
            now = time.monotonic()
            for w in self.workers:
                if w.restart_at is not None:
                    if w.restart_at <= now:
                        self._start(w)
                    else:
                        timeout = min(timeout, max(0.01, w.restart_at - now))
            if any(w.ready_fd is not None for w in self.workers):
                timeout = min(timeout, 0.05)
            info = signal.sigtimedwait(_SIGNALS, timeout)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_signo == signal.SIGHUP:
                self.log.info("forwarding", signal="SIGHUP", workers=len(self.workers))
                self._signal_all(signal.SIGHUP)
            elif not self.stopping:
                self._begin_stop(info.si_signo)

    # -- workers --------------------------------------------------------------

    def _start(self, w: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_fd)
            code = 1
            try:
                code = _worker_main(self.worker_settings, self.settings, w.index, write_fd, self.holder)
            except BaseException as e:  # a worker must never return into the supervisor's code
                with contextlib.suppress(BaseException):
                    self.log.error("worker_failed", worker=w.index, error=f"{type(e).__name__}: {e}")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        w.pid, w.started, w.ready, w.restart_at, w.ready_fd = pid, time.monotonic(), False, None, read_fd
        os.set_blocking(read_fd, False)

    def _poll_ready(self) -> None:
        for w in self.workers:
            if w.ready_fd is None:
                continue
            try:
                data = os.read(w.ready_fd, 1)
            except BlockingIOError:
                continue
            os.close(w.ready_fd)
            w.ready_fd = None
            w.ready = bool(data)
            if w.ready and self.holder is not None and w.failures + w.restarts:
                self.log.info("worker_restarted", worker=w.index, pid=w.pid)

    def _reap(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return out
            if pid == 0:
                return out
            out.append((pid, status))

    def _by_pid(self, pid: int) -> _Worker | None:
        return next((w for w in self.workers if w.pid == pid), None)

    def _exited(self, pid: int, status: int) -> None:
        w = self._by_pid(pid)
        if w is None:
            return
        if w.ready_fd is not None:
            os.close(w.ready_fd)
            w.ready_fd = None
        w.pid = 0
        if self.stopping:
            self.log.info("worker_stopped", worker=w.index, pid=pid, status=_describe(status))
            return
        lived = time.monotonic() - w.started
        w.failures = w.failures + 1 if lived < FLAPPING else 0
        delay = 0.0 if w.failures <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (w.failures - 2))
        w.restart_at = time.monotonic() + delay
        w.restarts += 1
        self.log.warning("worker_exited", worker=w.index, pid=pid, status=_describe(status), restart_in=delay)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    def _stop_all(self, force: bool) -> None:
        """SIGKILL whatever is still running (after the drain deadline, or on an error)."""
        live = [w for w in self.workers if w.pid]
        if not live:
            return
        if force:
            self._signal_all(signal.SIGKILL)
        for w in live:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
            w.pid = 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _worker_main(settings: Settings, original: Settings, index: int, ready_fd: int, holder: socket.socket | None) -> int:
    """In the forked child: a plain server with SO_REUSEPORT on."""
    if holder is not None:
        holder.close()  # the supervisor holds the port; a worker needs no copy
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    # Die with the supervisor, whatever kills it (SIGTERM: drain as usual).
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:
        return 1
    from .lifecycle import Server

    worker_settings = replace(settings, metrics_listen=_metrics_listen(original, index))

    def ready() -> None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    asyncio.run(Server(worker_settings, worker=index, on_ready=ready).serve())
    return 0

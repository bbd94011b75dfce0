"""What makes a ``ConfigSource`` read again: folder events and SIGHUP.

Two drivers of the same watch: ``AsyncDriver`` for the sampler and the
observer (the event loop keeps answering while the watch, and each reload,
runs in a thread) and ``WatchThread`` for ``up --inline``'s route reloader,
which has no event loop.

The folder is watched, not the file: editors and Kubernetes ConfigMaps
replace files rather than write them (``touches`` keeps the events that
concern the file). Once the watch is in place, one quiet reload catches an
edit made between the start-up read and the watch. A watch is on a folder,
not a path: when the folder is deleted or moved away, the watch is put on
the folder at the path once there is one again, with the same quiet reload
(``watch_folder``).

The watch is watchfiles' Rust backend (``RustNotify``, documented in
watchfiles' API reference) rather than its ``watch``/``awatch`` generators:
only the backend says when the watch is in place (its constructor returns),
so the quiet reload can come at once and the watch can then wait for events
with no timeout. The generators say so only with their first batch, which
comes after a timeout: a short one woke an idle process every 200 ms (~3 ms
of CPU a second); replacing a short first watch by a long one left a gap
between the two in which an edit went unseen for the long timeout.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog
from watchfiles import Change
from watchfiles._rust_notify import RustNotify

from .config.source import ConfigSource, touches

log = structlog.get_logger(component="config_watch")

# An edit is in force within about half a second: events are grouped for at
# most DEBOUNCE_MS, and a batch ends after STEP_MS without a new event. The
# Rust loop also looks at the stop event every STEP_MS, so a stop is seen as fast.
DEBOUNCE_MS = 200
STEP_MS = 50
# Wait for events with no timeout: nothing but an event or the stop wakes Python.
NO_TIMEOUT = 0
# While the folder is missing (deleted or moved away, not yet back), its
# nearest existing ancestor is watched until it comes back; this timeout only
# covers an event missed there (the folder replaced by a file, say), and
# applies only then: the watch on the folder itself has none.
MISSING_TIMEOUT_MS = 5000
# RustNotify's other settings: no debug output, the OS's notifications (the
# polling delay is then unused), the folder alone, permission errors raised.
_NOTIFY_OPTIONS = (False, False, 300, False, False)

# Told, for each batch of folder events, which files changed and whether they concern the file.
Seen = Callable[[list[str], bool], None]


class StopEvent(Protocol):
    """``threading.Event`` or ``asyncio.Event``: read from the watch's thread."""

    def is_set(self) -> bool: ...


class _EitherSet:
    """Set once either event is."""

    def __init__(self, first: StopEvent, second: StopEvent) -> None:
        self.events = (first, second)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


def watch_folder(source: ConfigSource, stop: StopEvent, seen: Seen | None = None, in_place: Callable[[], None] | None = None) -> None:
    """Reloads ``source`` on its folder's events until ``stop`` is set;
    blocks (run it in a thread). Returns at once if the source has no file.
    ``in_place``: told once an edit made from then on will be seen.

    A watch follows the folder it was put on, not its path: once that folder
    is deleted or moved away (``rm -rf cfg``, ``mv cfg cfg.old; mkdir cfg``)
    it hears nothing more of the path (or hears the moved folder under the
    old path). The watched folder's own deletion or move is an event of its
    watch, so a batch says so; each batch is also checked against the folder
    now at the path (one ``stat``, on events only: the idle watch is not
    woken). Then the watch is put on the folder at the path, once it exists
    (its nearest existing ancestor is watched meanwhile), and reloads
    quietly, as at start; both steps are logged."""
    told = _once(in_place)
    config = source.path
    if config is None:
        told()
        return
    folder = config.parent
    reason = "watch started"
    while not stop.is_set():
        if not _wait_for_folder(folder, stop, told):
            return  # stopped while the folder was missing
        armed = _identity(folder)
        try:
            notify = RustNotify([str(folder)], *_NOTIFY_OPTIONS)
        except FileNotFoundError:
            continue  # gone again before the watch was put on it
        except OSError as e:
            _cannot_watch(folder, e, stop, told)
            continue
        with notify:
            if armed is None or _identity(folder) != armed:
                continue  # replaced while the watch was put on it: which one it watches is unknown
            # The watch is in place: this read catches an edit made since the
            # start-up read (or since the folder came back).
            source.reload(reason, True)
            told()
            if reason != "watch started":
                log.info("config_watch_rearmed", folder=str(folder))
            _follow(notify, source, config, armed, stop, seen)
        if not stop.is_set():
            now = "missing" if _identity(folder) is None else "another folder"
            log.warning("config_folder_gone", folder=str(folder), now=now)
            reason = "watch re-armed"


def _once(callback: Callable[[], None] | None) -> Callable[[], None]:
    """``callback`` the first time the result is called; nothing after."""
    pending = [callback] if callback is not None else []

    def call() -> None:
        while pending:
            pending.pop()()

    return call


def _follow(notify: RustNotify, source: ConfigSource, config: Path, armed: tuple[int, int], stop: StopEvent, seen: Seen | None) -> None:
    """Reloads on ``notify``'s events until ``stop`` is set or the folder at
    the path is no longer the one watched (``armed``)."""
    folder = config.parent
    while not stop.is_set():
        batch: set[tuple[int, str]] | str = notify.watch(DEBOUNCE_MS, STEP_MS, NO_TIMEOUT, stop)
        if isinstance(batch, str):
            continue  # "stop" ends the loop; "signal" comes only to the main thread, "timeout" never
        relevant = touches(batch, config)
        if seen is not None:
            seen(sorted({Path(path).name for _, path in batch}), relevant)
        if relevant:
            # Read by path: the file as it is now, wherever the folder went
            # (a deleted file is reported, as when the file alone is deleted).
            source.reload("file changed")
        # The folder's own deletion or move away is reported as its deletion;
        # a new folder may have the old one's inode number, hence both tests.
        if (Change.deleted, str(folder)) in batch or _identity(folder) != armed:
            return


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which folder is at this path now (None: none)."""
    try:
        status = os.stat(folder)
    except OSError:
        return None
    return (status.st_dev, status.st_ino) if stat.S_ISDIR(status.st_mode) else None


def _wait_for_folder(folder: Path, stop: StopEvent, in_place: Callable[[], None]) -> bool:
    """Returns True once ``folder`` is a folder, False if ``stop`` is set first.
    While it is missing, its nearest existing ancestor is watched (the
    folder's creation, or the next missing step's, is an event of that
    watch), with a long timeout in case an event is missed; ``in_place`` is
    told once that watch is in place (the folder's creation will be seen)."""
    while not stop.is_set():
        if _identity(folder) is not None:
            return True
        ancestor = _nearest_folder(folder)
        try:
            notify = RustNotify([str(ancestor)], *_NOTIFY_OPTIONS)
        except FileNotFoundError:
            continue  # the ancestor went too: look again
        except OSError as e:
            _cannot_watch(ancestor, e, stop, in_place)
            continue
        with notify:
            # Looked at again once the watch is in place: a step that came meanwhile made no event of it.
            while not stop.is_set() and _identity(folder) is None and _nearest_folder(folder) == ancestor:
                in_place()
                batch = notify.watch(DEBOUNCE_MS, STEP_MS, MISSING_TIMEOUT_MS, stop)
                if not isinstance(batch, str) and (Change.deleted, str(ancestor)) in batch:
                    break  # the ancestor went (and may be back already, unwatched)
    return False


def _cannot_watch(folder: Path, error: OSError, stop: StopEvent, in_place: Callable[[], None]) -> None:
    """A folder the process may not watch (permissions changed with it): said,
    and tried again after MISSING_TIMEOUT_MS; the thread never ends on it (a
    watch thread that died would leave every later edit unseen, unlogged).
    The start-up is not held up meanwhile."""
    log.warning("config_watch_failed", folder=str(folder), error=str(error), retry_in_ms=MISSING_TIMEOUT_MS)
    in_place()
    waited = 0
    while waited < MISSING_TIMEOUT_MS and not stop.is_set():
        time.sleep(STEP_MS / 1000)
        waited += STEP_MS


def _nearest_folder(folder: Path) -> Path:
    """The nearest of the folder's ancestors that exists (the root, at worst)."""
    for ancestor in folder.parents:
        if _identity(ancestor) is not None:
            return ancestor
    return Path(folder.anchor)


class AsyncDriver:
    """Reloads ``source`` on folder events (``watch``) and on request (SIGHUP),
    each in a thread: parsing a large file must not stall the event loop."""

    def __init__(self, source: ConfigSource, seen: Seen | None = None) -> None:
        self.source = source
        self.seen = seen
        self._tasks: set[asyncio.Task[None]] = set()

    async def reload(self, reason: str, quiet: bool = False) -> None:
        await asyncio.to_thread(self.source.reload, reason, quiet)

    def request(self, reason: str) -> None:
        """A reload from a signal handler: scheduled on the running loop."""
        task = asyncio.get_running_loop().create_task(self.reload(reason))
        self._tasks.add(task)  # referenced until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def start(self, stop: asyncio.Event) -> asyncio.Task[None]:
        """``watch`` as a task, once the watch is in place and its quiet reload done
        (or once it ended): a process that says it serves only after this sees
        every edit made from then on, and does not read a file its caller is
        still writing in the same instant."""
        loop = asyncio.get_running_loop()
        in_place = asyncio.Event()

        def tell() -> None:  # from the watch's thread
            loop.call_soon_threadsafe(in_place.set)

        task = asyncio.create_task(self.watch(stop, tell))
        waiting = asyncio.create_task(in_place.wait())
        await asyncio.wait((task, waiting), return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        return task

    async def watch(self, stop: asyncio.Event, in_place: Callable[[], None] | None = None) -> None:
        """Until ``stop`` is set or the caller is cancelled."""
        cancelled = threading.Event()
        try:
            await asyncio.to_thread(watch_folder, self.source, _EitherSet(stop, cancelled), self.seen, in_place)
        finally:
            # A cancelled caller does not stop the thread; this does, within a step.
            # (asyncio.run waits for the default executor's threads before it returns.)
            cancelled.set()


class WatchThread:
    """Reloads ``source`` on folder events, from a daemon thread."""

    def __init__(self, source: ConfigSource, name: str = "config-watcher") -> None:
        self.source = source
        self.stop_event = threading.Event()
        self._in_place = threading.Event()
        self._thread = threading.Thread(
            target=watch_folder, args=(source, self.stop_event, None, self._in_place.set), name=name, daemon=True
        )

    def start(self) -> None:
        """Returns once the watch is in place and its quiet reload done (or it ended)."""
        self._thread.start()
        while not self._in_place.wait(0.05) and self._thread.is_alive():
            pass

    def stop(self) -> None:
        self.stop_event.set()

    def running(self) -> bool:
        return self._thread.is_alive()

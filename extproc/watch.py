"""What makes a ``ConfigSource`` read again: folder events and SIGHUP.

Two drivers of the same triggers: ``AsyncDriver`` for the sampler (the event
loop keeps answering while a reload parses in a thread) and ``WatchThread``
for ``up --inline``'s route reloader, which has no event loop.

The folder is watched, not the file: editors and Kubernetes ConfigMaps
replace files rather than write them (``touches`` keeps the events that
concern the file). Once the watch is in place, one quiet reload catches an
edit made between the start-up read and the watch. The first watch answers
within ``FIRST_WATCH``'s timeout even when nothing changes, so that reload
comes soon; it then gives way to a lasting watch that wakes Python only every
``LASTING_WATCH`` timeout when nothing changes, whose own first quiet reload
catches an edit made in the instant between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypedDict

import watchfiles

from .config.source import ConfigSource, touches


class _WatchOptions(TypedDict):
    debounce: int
    step: int
    recursive: bool
    yield_on_timeout: bool
    rust_timeout: int


# Short debounce and step: an edit is in force within about half a second, and
# a stop request is seen as fast. The timeout is how long the watch waits in
# Rust before it hands an empty batch back: short for the first (the start-up
# quiet reload), long after (each hand-back is a round trip through a worker
# thread and the event loop: every 200 ms, that cost an idle sampler or
# observer ~3 ms of CPU a second).
FIRST_WATCH: _WatchOptions = {"debounce": 200, "step": 50, "recursive": False, "yield_on_timeout": True, "rust_timeout": 200}
LASTING_WATCH: _WatchOptions = {**FIRST_WATCH, "rust_timeout": 5000}
# Each phase's watch ends after its first batch, the last one's at the stop.
PHASES = (FIRST_WATCH, LASTING_WATCH)

# Told, for each batch of folder events, which files changed and whether they concern the file.
Seen = Callable[[list[str], bool], None]


class _Triggers:
    """The reloads (reason, quiet) each batch of folder events asks for."""

    def __init__(self, config: Path, seen: Seen | None) -> None:
        self.config = config
        self.seen = seen
        self.started = False

    def reloads(self, changes: Iterable[tuple[object, str]]) -> list[tuple[str, bool]]:
        out = []
        if not self.started:
            # The first batch (a timeout at the latest) comes once the watch is in place.
            self.started = True
            out.append(("watch started", True))
        changes = list(changes)
        if changes:
            relevant = touches(changes, self.config)
            if self.seen is not None:
                self.seen(sorted({Path(p).name for _, p in changes}), relevant)
            if relevant:
                out.append(("file changed", False))
        return out


class AsyncDriver:
    """Reloads ``source`` on folder events (``watch``) and on request (SIGHUP),
    each in a thread: parsing a large file must not stall the event loop."""

    def __init__(self, source: ConfigSource, seen: Seen | None = None, phases: tuple[_WatchOptions, ...] = PHASES) -> None:
        self.source = source
        self.seen = seen
        self.phases = phases
        self._tasks: set[asyncio.Task[None]] = set()

    async def reload(self, reason: str, quiet: bool = False) -> None:
        await asyncio.to_thread(self.source.reload, reason, quiet)

    def request(self, reason: str) -> None:
        """A reload from a signal handler: scheduled on the running loop."""
        task = asyncio.get_running_loop().create_task(self.reload(reason))
        self._tasks.add(task)  # referenced until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def watch(self, stop: asyncio.Event) -> None:
        config = self.source.path
        if config is None:
            return
        for phase, options in enumerate(self.phases, 1):
            triggers = _Triggers(config, self.seen)
            async with contextlib.aclosing(watchfiles.awatch(config.parent, stop_event=stop, **options)) as batches:
                async for changes in batches:
                    for reason, quiet in triggers.reloads(changes):
                        await self.reload(reason, quiet)
                    if phase < len(self.phases):
                        break  # one batch, then the next phase's watch
            if stop.is_set():
                return


class WatchThread:
    """Reloads ``source`` on folder events, from a daemon thread."""

    def __init__(self, source: ConfigSource, name: str = "config-watcher", phases: tuple[_WatchOptions, ...] = PHASES) -> None:
        self.source = source
        self.phases = phases
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def running(self) -> bool:
        return self._thread.is_alive()

    def _watch(self) -> None:
        config = self.source.path
        if config is None:
            return
        for phase, options in enumerate(self.phases, 1):
            triggers = _Triggers(config, None)
            with contextlib.closing(watchfiles.watch(config.parent, stop_event=self.stop_event, **options)) as batches:
                for changes in batches:
                    for reason, quiet in triggers.reloads(changes):
                        self.source.reload(reason, quiet)
                    if phase < len(self.phases):
                        break  # one batch, then the next phase's watch
            if self.stop_event.is_set():
                return

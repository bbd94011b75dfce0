"""The settings watch on a real folder (watchfiles' Rust backend, real
events): the quiet reload comes as soon as the watch is in place, without
waiting for a timeout; every edit is seen, however soon it follows the
reload of the one before; nothing else wakes it; a stop ends both drivers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from extproc.config.settings import Settings
from extproc.config.source import ConfigSource
from extproc.watch import AsyncDriver, WatchThread
from tests.support.procs import wait_until

STARTED = ("watch started", True)
CHANGED = ("file changed", False)
EDITS = 5
# Far below any timeout a watch might wait for before its first batch, far above an event's path through debounce.
SEEN_WITHIN_S = 3


class Reloads(ConfigSource):
    """A source that records the reloads asked of it (and reads nothing)."""

    def __init__(self, config: Path) -> None:
        super().__init__(Settings.load({"MIRROR_CONFIG": str(config)}), judge=None, built_from=None)  # type: ignore[arg-type]  # never judges
        self.asked: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def reload(self, reason: str, quiet: bool = False) -> None:
        with self._lock:
            self.asked.append((reason, quiet))

    def seen(self) -> list[tuple[str, bool]]:
        with self._lock:
            return list(self.asked)


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "routes.yaml"
    config.write_text("a\n")
    return config


def _edit_at_once_after_each_reload(source: Reloads, config: Path) -> None:
    """The watch's life as the ConfigMap test saw it: each edit made the
    instant the previous one was reloaded (an edit in a gap between two
    watches went unseen until the second one's timeout)."""
    wait_until(lambda: source.seen() == [STARTED], SEEN_WITHIN_S, "the quiet reload once the watch is in place")
    for edit in range(1, EDITS + 1):
        config.write_text(f"edit {edit}\n")
        wait_until(lambda: source.seen().count(CHANGED) >= edit, SEEN_WITHIN_S, f"edit {edit} seen")  # noqa: B023 - called before the loop moves on


def _check(source: Reloads) -> None:
    seen = source.seen()
    # One quiet reload, first: nothing but an event asks for another.
    assert seen[0] == STARTED and seen.count(STARTED) == 1
    assert set(seen) == {STARTED, CHANGED}


def test_the_async_driver_reloads_once_in_place_and_on_every_edit(tmp_path: Path) -> None:
    config = _config(tmp_path)
    source = Reloads(config)

    async def run() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(AsyncDriver(source).watch(stop))
        try:
            await asyncio.to_thread(_edit_at_once_after_each_reload, source, config)
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 10)

    asyncio.run(run())
    _check(source)


def test_the_watch_thread_reloads_once_in_place_and_on_every_edit(tmp_path: Path) -> None:
    config = _config(tmp_path)
    source = Reloads(config)
    watcher = WatchThread(source)
    watcher.start()
    try:
        _edit_at_once_after_each_reload(source, config)
    finally:
        watcher.stop()
    wait_until(lambda: not watcher.running(), 10, "the watch thread to end at the stop")
    _check(source)


def test_events_that_do_not_concern_the_file_ask_for_no_reload(tmp_path: Path) -> None:
    config = _config(tmp_path)
    source = Reloads(config)
    told: list[tuple[list[str], bool]] = []

    async def run() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(AsyncDriver(source, seen=lambda files, relevant: told.append((files, relevant))).watch(stop))
        try:
            await asyncio.to_thread(wait_until, lambda: source.seen() == [STARTED], SEEN_WITHIN_S, "the quiet reload")
            (tmp_path / "other.yaml").write_text("x\n")
            await asyncio.to_thread(wait_until, lambda: (["other.yaml"], False) in told, SEEN_WITHIN_S, "the other file's event")
            # The positive witness: an edit of the file after it is reloaded.
            config.write_text("b\n")
            await asyncio.to_thread(wait_until, lambda: CHANGED in source.seen(), SEEN_WITHIN_S, "the file's edit")
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 10)

    asyncio.run(run())
    assert source.seen() == [STARTED, CHANGED]


def test_a_cancelled_async_watch_ends_its_thread(tmp_path: Path) -> None:
    """The sampler cancels its watch task when it stops; asyncio.run then waits for
    the default executor's threads, the watch's among them, before it returns."""
    source = Reloads(_config(tmp_path))

    async def run() -> None:
        watcher = asyncio.create_task(AsyncDriver(source).watch(asyncio.Event()))  # never set
        await asyncio.to_thread(wait_until, lambda: source.seen() == [STARTED], SEEN_WITHIN_S, "the quiet reload")
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    runner = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "asyncio.run still waiting for the watch's thread"


def test_each_driver_starts_once_its_quiet_reload_is_done(tmp_path: Path) -> None:
    """So a process that says it serves after the start sees every edit made from
    then on, and its quiet reload never reads a file written in the same instant."""
    source = Reloads(_config(tmp_path))
    thread = WatchThread(source)
    thread.start()
    try:
        assert source.seen() == [STARTED]
    finally:
        thread.stop()
    wait_until(lambda: not thread.running(), 10, "the watch thread to end at the stop")

    source = Reloads(_config(tmp_path))

    async def run() -> None:
        stop = asyncio.Event()
        watcher = await AsyncDriver(source).start(stop)
        try:
            assert source.seen() == [STARTED] and not watcher.done()
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 10)

    asyncio.run(run())

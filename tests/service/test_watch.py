"""The settings watch on a real folder (watchfiles' own watcher, real events):
a first watch that answers soon, for the start-up quiet reload, then a lasting
one with a quiet reload of its own (an edit between the two is caught) that
still sees edits, and a stop that ends both drivers."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from extproc.config.settings import Settings
from extproc.config.source import ConfigSource
from extproc.watch import FIRST_WATCH, LASTING_WATCH, AsyncDriver, WatchThread, _WatchOptions
from tests.support.procs import wait_until

# Short timeouts, so that the test waits for both phases' empty batches in well under a second.
PHASES: tuple[_WatchOptions, ...] = ({**FIRST_WATCH, "rust_timeout": 100}, {**LASTING_WATCH, "rust_timeout": 400})
STARTED = ("watch started", True)
CHANGED = ("file changed", False)


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


def _edit_after_both_phases_started(source: Reloads, config: Path) -> None:
    wait_until(lambda: source.seen().count(STARTED) == 2, 10, "the first watch's quiet reload, then the lasting watch's")
    config.write_text("b\n")
    wait_until(lambda: CHANGED in source.seen(), 10, "the lasting watch to see the edit")


def test_the_async_driver_gives_way_to_a_lasting_watch_that_still_sees_edits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    source = Reloads(config)

    async def run() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(AsyncDriver(source, phases=PHASES).watch(stop))
        try:
            await asyncio.to_thread(_edit_after_both_phases_started, source, config)
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 10)

    asyncio.run(run())
    seen = source.seen()
    assert seen[:2] == [STARTED, STARTED]
    # One quiet reload per phase: the lasting watch's later empty batches ask for none.
    assert seen.count(STARTED) == 2 and CHANGED in seen


def test_the_watch_thread_gives_way_to_a_lasting_watch_that_still_sees_edits(tmp_path: Path) -> None:
    config = _config(tmp_path)
    source = Reloads(config)
    watcher = WatchThread(source, phases=PHASES)
    watcher.start()
    try:
        _edit_after_both_phases_started(source, config)
    finally:
        watcher.stop()
    wait_until(lambda: not watcher.running(), 10, "the watch thread to end at the stop")
    seen = source.seen()
    assert seen[:2] == [STARTED, STARTED]
    assert seen.count(STARTED) == 2 and CHANGED in seen

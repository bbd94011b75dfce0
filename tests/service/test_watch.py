"""The settings watch on a real folder (watchfiles' Rust backend, real
events): the quiet reload comes as soon as the watch is in place, without
waiting for a timeout; every edit is seen, however soon it follows the
reload of the one before; nothing else wakes it; a stop ends both drivers;
a folder deleted or replaced is watched again once it is back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


# -- the folder replaced or deleted: the watch follows the path ------------------


class Judged:
    """A judge that records what a real source (real reads) tells it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def judge(self, text: str | None, reason: str) -> None:
        with self._lock:
            self.events.append(("judged", text or ""))

    def unchanged(self, reason: str) -> None:
        with self._lock:
            self.events.append(("unchanged", reason))

    def rejected(self, reason: str, problems: list[str]) -> None:
        with self._lock:
            self.events.append(("rejected", problems[0]))

    def failed(self, reason: str, error: Exception) -> None:
        with self._lock:
            self.events.append(("failed", repr(error)))

    def seen(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.events)

    def judged(self, text: str) -> bool:
        return ("judged", text) in self.seen()


@pytest.fixture(params=["async", "thread"])
def driver(request: pytest.FixtureRequest) -> str:
    """Both drivers: the sampler's and observer's (``AsyncDriver``), ``up --inline``'s (``WatchThread``)."""
    return str(request.param)


@contextlib.contextmanager
def watching(driver: str, source: ConfigSource) -> Iterator[None]:
    """``source`` watched by ``driver`` from the moment the driver says it is in place."""
    if driver == "thread":
        thread = WatchThread(source)
        thread.start()
        try:
            yield
        finally:
            thread.stop()
        wait_until(lambda: not thread.running(), 10, "the watch thread to end at the stop")
        return
    started = threading.Event()
    loop_and_stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def run() -> None:
        stop = asyncio.Event()
        loop_and_stop.append((asyncio.get_running_loop(), stop))
        watcher = await AsyncDriver(source).start(stop)
        started.set()
        await watcher

    runner = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    runner.start()
    assert started.wait(10), "the async driver did not start"
    try:
        yield
    finally:
        loop, stop = loop_and_stop[0]
        loop.call_soon_threadsafe(stop.set)
        runner.join(10)
        assert not runner.is_alive(), "the async driver did not end at the stop"


def _real_source(config: Path, judge: Judged) -> ConfigSource:
    return ConfigSource(Settings.load({"MIRROR_CONFIG": str(config)}), judge, built_from=config.read_text() if config.exists() else None)


def _folder(tmp_path: Path) -> Path:
    config = tmp_path / "cfg" / "routes.yaml"
    config.parent.mkdir()
    config.write_text("v1\n")
    return config


def test_a_folder_moved_away_and_replaced_is_watched_again(tmp_path: Path, driver: str) -> None:
    """``mv cfg cfg.old; mkdir cfg``: the watch was on the folder now called
    cfg.old; the file in the new cfg, and every later edit, is still seen."""
    config = _folder(tmp_path)
    judge = Judged()
    with watching(driver, _real_source(config, judge)):
        config.parent.rename(tmp_path / "cfg.old")
        config.parent.mkdir()
        config.write_text("v2\n")
        wait_until(lambda: judge.judged("v2\n"), SEEN_WITHIN_S, "the file in the new folder")
        config.write_text("v3\n")
        wait_until(lambda: judge.judged("v3\n"), SEEN_WITHIN_S, "an edit in the new folder")
        # The old folder is no longer watched: its file's events ask for nothing.
        before = len(judge.seen())
        (tmp_path / "cfg.old" / "routes.yaml").write_text("old\n")
        (tmp_path / "cfg.old" / "routes.yaml").unlink()
        config.write_text("v4\n")  # the positive witness
        wait_until(lambda: judge.judged("v4\n"), SEEN_WITHIN_S, "the witness edit")
    assert judge.seen()[before:] == [("judged", "v4\n")]


def test_a_folder_deleted_and_recreated_is_watched_again(tmp_path: Path, driver: str) -> None:
    """``rm -rf cfg; mkdir cfg``: the new folder may even get the old one's inode number."""
    config = _folder(tmp_path)
    judge = Judged()
    with watching(driver, _real_source(config, judge)):
        shutil.rmtree(config.parent)
        # The file's deletion is reported as before (the content in force stays).
        wait_until(lambda: any(kind == "rejected" for kind, _ in judge.seen()), SEEN_WITHIN_S, "the deletion")
        config.parent.mkdir()
        config.write_text("v2\n")
        wait_until(lambda: judge.judged("v2\n"), SEEN_WITHIN_S, "the file in the recreated folder")
        config.write_text("v3\n")
        wait_until(lambda: judge.judged("v3\n"), SEEN_WITHIN_S, "an edit in the recreated folder")


def test_a_watch_on_a_missing_folder_waits_for_it(tmp_path: Path, driver: str) -> None:
    """What the watch does between a folder's deletion and its return, made
    deterministic: the driver says it is in place once the folder's nearest
    existing ancestor is watched, so its creation (two levels down) is seen."""
    config = tmp_path / "a" / "cfg" / "routes.yaml"
    judge = Judged()
    with watching(driver, _real_source(config, judge)):
        config.parent.mkdir(parents=True)
        config.write_text("v1\n")
        wait_until(lambda: judge.judged("v1\n"), SEEN_WITHIN_S, "the file once its folder exists")
        config.write_text("v2\n")
        wait_until(lambda: judge.judged("v2\n"), SEEN_WITHIN_S, "an edit after it")


def test_a_fifo_in_the_file_s_place_is_refused_and_reloading_goes_on(tmp_path: Path, driver: str) -> None:
    """The reload thread must not block on it: the next regular content is judged."""
    config = _folder(tmp_path)
    judge = Judged()
    with watching(driver, _real_source(config, judge)):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.replace(fifo, config)
        wait_until(
            lambda: ("rejected", f"MIRROR_CONFIG: cannot read {config}: not a regular file (a FIFO)") in judge.seen(),
            SEEN_WITHIN_S,
            "the refusal",
        )
        replacement = tmp_path / "new.yaml"
        replacement.write_text("v2\n")
        os.replace(replacement, config)
        wait_until(lambda: judge.judged("v2\n"), SEEN_WITHIN_S, "the next regular content")
    assert not any(kind in {"judged", "failed"} for kind, text in judge.seen() if text != "v2\n")


def test_a_folder_the_watch_may_not_watch_yet_is_tried_again(tmp_path: Path, driver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch refused (permissions, changed with a replaced folder) is said
    and tried again; before, the thread died and no later edit was seen."""
    import structlog.testing
    from watchfiles._rust_notify import RustNotify

    import extproc.watch as watch

    refusals = [PermissionError("Permission denied")] * 2

    def notify(paths: list[str], *options: Any) -> RustNotify:
        if refusals:
            raise refusals.pop()
        return RustNotify(paths, *options)

    monkeypatch.setattr(watch, "RustNotify", notify)
    monkeypatch.setattr(watch, "MISSING_TIMEOUT_MS", 100)
    config = _folder(tmp_path)
    judge = Judged()
    with structlog.testing.capture_logs() as logged, watching(driver, _real_source(config, judge)):
        wait_until(lambda: not refusals, SEEN_WITHIN_S, "the refused watches")
        config.write_text("v2\n")
        wait_until(lambda: judge.judged("v2\n"), SEEN_WITHIN_S, "an edit once the watch is in place")
    assert [e["event"] for e in logged if e["event"] == "config_watch_failed"] == ["config_watch_failed"] * 2

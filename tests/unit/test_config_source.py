"""The configuration source: each content judged once, one reload at a time,
the last content read in force, which folder events concern the file, and
what kind of file is read at all.

The file is a variable here (the source's ``read`` is injected), and a
reload requested while another runs is simulated by requesting it from
inside the running reload's read: deterministic, no threads. The tests of
what is read use real files; those that could block (a FIFO) read in a
thread and fail, rather than hang, if the read does not return."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.cli import main
from extproc.config.errors import ConfigError
from extproc.config.settings import Settings
from extproc.config.source import MAX_CONFIG_BYTES, ConfigFile, ConfigSource, read_manifest, touches
from tests.support.paths import CONFORMANCE

SETTINGS = Settings.load({"MIRROR_CONFIG": "/config/routes.yaml"})


class Recorder:
    """A judge that records what it was told; ``invalid`` contents are rejected."""

    def __init__(self, in_force: str = "a", invalid: frozenset[str] = frozenset(), bug: frozenset[str] = frozenset()) -> None:
        self.in_force = in_force
        self.invalid = invalid
        self.bug = bug
        self.seen: list[str] = []  # every content judge() was given
        self.events: list[tuple[str, str]] = []

    def judge(self, text: str | None, reason: str) -> None:
        assert text is not None
        self.seen.append(text)
        if text in self.bug:
            raise KeyError(text)
        if text in self.invalid:
            raise ConfigError([f"{text} is invalid"])
        self.in_force = text
        self.events.append(("judged", text))

    def unchanged(self, reason: str) -> None:
        self.events.append(("unchanged", reason))

    def rejected(self, reason: str, problems: list[str]) -> None:
        self.events.append(("rejected", problems[0]))

    def failed(self, reason: str, error: Exception) -> None:
        self.events.append(("failed", repr(error)))


class File:
    """The configuration file; ``on_read`` runs during a read (another request arriving)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.reads: list[str] = []
        self.on_read: Callable[[], None] | None = None

    def read(self, settings: ConfigFile) -> str:
        self.reads.append(self.text)
        read = self.text
        if self.on_read is not None:
            hook, self.on_read = self.on_read, None
            hook()
        return read


def source_of(file: File, judge: Recorder) -> ConfigSource:
    return ConfigSource(SETTINGS, judge, built_from=file.text, read=file.read)


def test_the_start_up_content_is_judged_already() -> None:
    file, judge = File("a"), Recorder()
    source = source_of(file, judge)
    source.reload("SIGHUP")
    source.reload("watch started", quiet=True)
    assert judge.events == [("unchanged", "SIGHUP")]


def test_each_content_is_judged_once_however_many_reloads() -> None:
    file, judge = File("a"), Recorder(invalid=frozenset({"bad"}))
    source = source_of(file, judge)
    file.text = "bad"
    for _ in range(3):
        source.reload("file changed")
    file.text = "b"
    source.reload("file changed")
    assert judge.events == [("rejected", "bad is invalid"), ("unchanged", "file changed"), ("unchanged", "file changed"), ("judged", "b")]
    assert judge.in_force == "b"


def test_an_unreadable_file_is_rejected_each_time_and_judges_nothing() -> None:
    judge = Recorder()
    reads: Iterator[str | ConfigError] = iter([ConfigError(["cannot read"]), ConfigError(["cannot read"]), "a"])

    def read(settings: ConfigFile) -> str:
        got = next(reads)
        if isinstance(got, ConfigError):
            raise got
        return got

    source = ConfigSource(SETTINGS, judge, built_from="a", read=read)
    for _ in range(3):
        source.reload("file changed")
    # Back to the content in force: nothing new to judge.
    assert judge.events == [("rejected", "cannot read"), ("rejected", "cannot read"), ("unchanged", "file changed")]


def test_a_bug_in_the_judge_is_reported_and_reloading_goes_on() -> None:
    file, judge = File("a"), Recorder(bug=frozenset({"b"}))
    source = source_of(file, judge)
    file.text = "b"
    source.reload("file changed")
    file.text = "c"
    source.reload("file changed")
    assert judge.events == [("failed", "KeyError('b')"), ("judged", "c")]


def test_a_request_during_a_reload_reads_again_after_it() -> None:
    """The watcher's reload has read "b"; SIGHUP comes after an edit to "c".
    SIGHUP's request returns at once; the running reload reads again."""
    file, judge = File("a"), Recorder()
    source = source_of(file, judge)
    file.text = "b"

    def sighup_after_an_edit() -> None:
        file.text = "c"
        source.reload("SIGHUP")
        assert judge.events == []  # nothing judged yet: one reload at a time

    file.on_read = sighup_after_an_edit
    source.reload("file changed")
    assert file.reads == ["b", "c"]
    assert judge.events == [("judged", "b"), ("judged", "c")]
    assert judge.in_force == "c"


def test_requests_during_a_reload_become_one_reload_counted_unless_all_are_quiet() -> None:
    file, judge = File("a"), Recorder()
    source = source_of(file, judge)

    def burst() -> None:
        source.reload("watch started", quiet=True)
        for _ in range(5):
            source.reload("SIGHUP")

    file.on_read = burst
    source.reload("watch started", quiet=True)
    assert file.reads == ["a", "a"]
    assert judge.events == [("unchanged", "SIGHUP")]


# One step: the file is edited, a reload is requested, and during its read
# more edits arrive, each with its own request (what a watcher and SIGHUP do).
steps = st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.sampled_from("abcx"), max_size=3)), max_size=8)


def edit_during_reads(file: File, source: ConfigSource, pending: list[str]) -> None:
    """Each read sees the next pending edit arrive, with its own request."""

    def arrive() -> None:
        if pending:
            file.text = pending.pop(0)
            file.on_read = arrive
            source.reload("SIGHUP")

    file.on_read = arrive


@given(steps)
def test_the_last_content_read_is_in_force_and_never_judged_twice_in_a_row(plan: list[tuple[str, list[str]]]) -> None:
    file, judge = File("a"), Recorder(invalid=frozenset({"x"}))
    source = source_of(file, judge)
    for text, arriving in plan:
        file.text = text
        pending = list(arriving)
        edit_during_reads(file, source, pending)
        source.reload("file changed")
        assert not pending, "every arrival was read"
        # Whatever came during the reload, the file was read once more after the last edit.
        assert file.reads[-1] == file.text
    assert judge.in_force == next((r for r in reversed(file.reads) if r != "x"), "a")
    assert all(before != after for before, after in zip(["a", *judge.seen], judge.seen, strict=False))


def test_folder_events_that_concern_the_file() -> None:
    config = Path("/mount/routes.yaml")
    assert touches([(1, "/mount/routes.yaml")], config)
    # A ConfigMap update swaps the ..data symlink; the file's path is unchanged.
    assert touches([(1, "/mount/..data_tmp"), (2, "/mount/..data")], config)
    assert not touches([(2, "/mount/sampler.log"), (1, "/mount/routes.yaml.swp")], config)
    assert not touches([], config)


def test_a_file_of_the_same_name_elsewhere_does_not_concern_the_file() -> None:
    """Full paths, as the watch reports them (its folder as given: absolute, unresolved)."""
    config = Path("/mount/routes.yaml")
    assert not touches([(3, "/mount.old/routes.yaml"), (2, "/elsewhere/routes.yaml")], config)
    assert not touches([(2, "/mount/sub/routes.yaml"), (1, "/elsewhere/..data")], config)
    assert touches([(2, "/x/../mount/routes.yaml")], Path("/x/../mount/routes.yaml"))


# -- what kind of file is read -------------------------------------------------


def _settings(path: Path | str) -> Settings:
    return Settings.load({"MIRROR_CONFIG": str(path)})


def _within(seconds: float, call: Callable[[], object]) -> object:
    """``call()``'s result or exception, from a thread; fails if it blocks longer."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as e:  # handed to the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    return outcome[0]


def _refused(path: Path | str) -> str:
    """The one problem reading ``path`` reports."""
    outcome = _within(10, lambda: read_manifest(_settings(path)))
    assert isinstance(outcome, ConfigError), outcome if isinstance(outcome, BaseException) else f"read {len(str(outcome))} characters"
    [problem] = outcome.problems
    return problem


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    os.mkfifo(path)
    return path


def test_only_a_regular_file_is_read(tmp_path: Path, fifo: Path) -> None:
    """A FIFO would block the read until something writes to it, a device
    need never end (/dev/zero: all memory); each is named, with the variable."""
    assert _refused(fifo) == f"MIRROR_CONFIG: cannot read {fifo}: not a regular file (a FIFO)"
    assert _refused("/dev/null") == "MIRROR_CONFIG: cannot read /dev/null: not a regular file (a character device)"
    assert _refused(tmp_path) == f"MIRROR_CONFIG: cannot read {tmp_path}: not a regular file (a folder)"
    # Symlinks are followed (a ConfigMap's file is one): to what they name.
    link = tmp_path / "link.yaml"
    link.symlink_to(fifo)
    assert _refused(link) == f"MIRROR_CONFIG: cannot read {link}: not a regular file (a FIFO)"
    target = tmp_path / "target.yaml"
    target.write_text("a: 1\r\nb: 2\n")
    link.unlink()
    link.symlink_to(target)
    assert read_manifest(_settings(link)) == "a: 1\nb: 2\n"  # newlines as a text-mode read has them


def test_the_size_read_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    with path.open("wb") as file:  # sparse: costs no disk
        file.truncate(MAX_CONFIG_BYTES)
    assert len(read_manifest(_settings(path)) or "") == MAX_CONFIG_BYTES
    with path.open("ab") as file:
        file.write(b"\n")
    assert _refused(path) == f"MIRROR_CONFIG: cannot read {path}: larger than 16 MiB, the most a configuration file may hold"


def test_a_reload_of_a_file_that_is_no_longer_regular_is_refused_and_the_content_stays(tmp_path: Path, fifo: Path) -> None:
    """The real read: the reload thread must not block on a FIFO put in the file's place."""
    judge = Recorder()
    config = tmp_path / "cfg.yaml"
    config.write_text("a")
    source = ConfigSource(_settings(config), judge, built_from="a")
    os.replace(fifo, config)
    assert _within(10, lambda: source.reload("file changed")) is None
    assert judge.events == [("rejected", f"MIRROR_CONFIG: cannot read {config}: not a regular file (a FIFO)")]
    assert judge.in_force == "a"
    # Reloading goes on: the next regular content is judged.
    replacement = tmp_path / "new.yaml"
    replacement.write_text("b")
    os.replace(replacement, config)
    source.reload("file changed")
    assert judge.events[-1] == ("judged", "b")


def test_a_command_that_reads_once_takes_a_pipe_as_a_shell_gives_one(fifo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config --config <(...): what the command was given, read once
    (within the size bound); only what is read again and again, by a server
    and its reloads, must be a regular file."""

    def write() -> None:
        with open(fifo, "wb") as pipe:
            pipe.write(CONFORMANCE.read_bytes())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert _within(10, lambda: main(["check-config", "--config", str(fifo)])) == 0
    writer.join(10)
    assert "configuration OK" in capsys.readouterr().out
    assert read_manifest(_settings("/dev/null"), once=True) == ""
    with pytest.raises(ConfigError) as refused:
        read_manifest(_settings(str(fifo.parent)), once=True)
    assert refused.value.problems == [f"MIRROR_CONFIG: cannot read {fifo.parent}: not a file to read (a folder)"]


def test_the_sampler_refuses_to_start_on_a_fifo(tmp_path: Path, fifo: Path) -> None:
    """The start-up read would block until something writes to it: a clear
    error and a non-zero exit instead, before anything listens. (A FIFO
    rather than /dev/zero: against a tree without the check, the test then
    times out instead of taking the machine's memory.)"""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(fifo), "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert f"MIRROR_CONFIG: cannot read {fifo}: not a regular file (a FIFO)" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_regular_file_reads_as_before() -> None:
    assert read_manifest(_settings(CONFORMANCE)) == CONFORMANCE.read_text(encoding="utf-8")

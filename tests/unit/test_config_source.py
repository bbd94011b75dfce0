"""The configuration source: each content judged once, one reload at a time,
the last content read in force, and which folder events concern the file.

The file is a variable here (the source's ``read`` is injected), and a
reload requested while another runs is simulated by requesting it from
inside the running reload's read: deterministic, no threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from extproc.config.errors import ConfigError
from extproc.config.settings import Settings
from extproc.config.source import ConfigFile, ConfigSource, touches

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

"""The session group's nice value (extproc/priority.py), against a fake
/proc/self/autogroup, and a refused SCHED_IDLE; the real file and the real
policy, with real observers: the nice test in tests/service/test_compare_cli.py."""

from __future__ import annotations

import errno
import os

import pytest

from extproc.priority import MAX_NICE, lower_session_group, take_idle_policy


class FakeGroup:
    def __init__(self, shown: str | None, refusals: list[int] | None = None) -> None:
        self.shown = shown
        self.refusals = list(refusals or [])
        self.written: list[str] = []

    def read_text(self) -> str:
        if self.shown is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return self.shown

    def write_text(self, data: str) -> int:
        self.written.append(data)
        if self.refusals:
            code = self.refusals.pop(0)
            raise OSError(code, "refused")
        return len(data)

    def __str__(self) -> str:
        return "/proc/self/autogroup"


def test_the_group_is_lowered_by_the_increment_from_its_own_value() -> None:
    group = FakeGroup("/autogroup-1966 nice 3\n")
    assert lower_session_group(10, group) == (13, None)
    assert group.written == ["13"]


def test_the_group_stops_at_the_lowest_priority() -> None:
    group = FakeGroup("/autogroup-7 nice 15\n")
    assert lower_session_group(10, group) == (MAX_NICE, None)
    assert group.written == [str(MAX_NICE)]


def test_a_kernel_without_autogroups_is_left_alone_and_quietly() -> None:
    assert lower_session_group(10, FakeGroup(None)) == (None, None)


def test_a_session_in_no_group_of_its_own_is_left_alone_and_quietly() -> None:
    group = FakeGroup("")  # what the kernel shows for the session processes inherit from init
    assert lower_session_group(10, group) == (None, None)
    assert group.written == []


def test_the_kernels_rate_limit_is_waited_out() -> None:
    pauses: list[float] = []
    group = FakeGroup("/autogroup-8 nice 0\n", [errno.EAGAIN, errno.EAGAIN])
    assert lower_session_group(10, group, pauses.append) == (10, None)
    assert group.written == ["10", "10", "10"] and len(pauses) == 2


def test_a_refusal_is_reported_not_raised() -> None:
    group = FakeGroup("/autogroup-9 nice 0\n", [errno.EPERM])
    assert lower_session_group(10, group) == (None, "/proc/self/autogroup: refused")
    always_busy = FakeGroup("/autogroup-9 nice 0\n", [errno.EAGAIN] * 1000)
    group_nice, why = lower_session_group(10, always_busy, lambda _: None)
    assert group_nice is None and why is not None and "still busy" in why


def test_unexpected_contents_are_reported() -> None:
    group_nice, why = lower_session_group(10, FakeGroup("something else\n"))
    assert group_nice is None and why is not None and "unexpected contents 'something else'" in why


def test_a_refused_idle_policy_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert take_idle_policy() == "SCHED_IDLE: Operation not permitted"

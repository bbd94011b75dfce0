"""Lowering a background process's CPU priority so that it counts against Envoy.

Linux with autogroups (``CONFIG_SCHED_AUTOGROUP`` and
``kernel.sched_autogroup_enabled``, on by default in most distributions)
schedules each session as one group, and a nice value orders a process only
against the processes of its own session. A process that leads a session of
its own (started by a supervisor, ``setsid``) is a group alone, so its
nice value by itself changes nothing against Envoy in another session: the
group's nice value, in ``/proc/self/autogroup``, is what does
(``bench/sched_wakeup.py`` measures both). `up` starts its children in its
own session, Envoy and the observers in one group. Outside the root cgroup (a
container, a systemd service with the cpu controller) the kernel uses the
cgroup instead and the group's value is inert, which is harmless.

A nice value, even the group's, sets a share of a busy core, not who runs
first. So the process also takes Linux's SCHED_IDLE policy: a core running
only SCHED_IDLE threads counts as free when the kernel places a waking
thread, and inside its own group a SCHED_IDLE thread is preempted by any
other that wakes (across groups, on recent kernels, only placement is
said to remain: not checked here); its group's or container's weight still
sets its share of a busy core. Measured with ``bench/compare_latency.py``
(docs/compare.md, "The primary's latency, interleaved" and "The observers
in Envoy's session"): each observer in a session of its own, the observers
added 0.6 ms to the primary's p99; in Envoy's session (one group), 0.1.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

AUTOGROUP = Path("/proc/self/autogroup")
AUTOGROUPS_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")
MAX_NICE = 19
# The kernel takes one autogroup change per 100 ms from writers without
# CAP_SYS_ADMIN, machine-wide, and answers EAGAIN inside that window: several
# observers started together (one per core) wait their turns, up to 2 s in all.
_BUSY_PAUSE_S = 0.02
_BUSY_TRIES = 100
_GROUP_NICE = re.compile(r"\bnice (-?\d+)\b")
# Linux only: elsewhere os has no such policy.
_SCHED_IDLE: int | None = getattr(os, "SCHED_IDLE", None)


class GroupFile(Protocol):
    """What is used of ``/proc/self/autogroup`` (a Path; a fake in tests)."""

    def read_text(self) -> str: ...

    def write_text(self, data: str) -> int: ...


@dataclass(frozen=True)
class Priority:
    niceness: int
    # The session group's nice value as written; None where the process does
    # not lead its session, the kernel groups no sessions, or it refused. In a
    # container (a CPU cgroup of its own) the write is accepted and inert.
    group_niceness: int | None
    # Why the group was left as it was, for the log; None when it was lowered
    # or there was nothing to lower.
    group_unchanged: str | None = None
    # Whether this thread (and every thread it starts after) is under SCHED_IDLE
    # (taken, or inherited), and why not where it was wanted and refused.
    idle: bool = False
    idle_unchanged: str | None = None


def lower_cpu_priority(increment: int) -> Priority:
    """Raises this process's nice value by ``increment``, and its session
    group's by as much where the process leads its session (a group shared
    with a shell would slow the shell too); with any increment, also puts the
    calling thread under SCHED_IDLE. Call it before the process starts a
    thread: a thread takes its policy from the thread that starts it."""
    niceness = os.nice(increment)
    if increment == 0:
        return Priority(niceness, None, idle=is_idle())
    idle_unchanged = take_idle_policy()
    idle = is_idle()
    if os.getsid(0) != os.getpid() or not _autogroups_enabled():
        return Priority(niceness, None, idle=idle, idle_unchanged=idle_unchanged)
    group, unchanged = lower_session_group(increment, AUTOGROUP)
    return Priority(niceness, group, unchanged, idle, idle_unchanged)


def is_idle() -> bool:
    """Whether the calling thread is under SCHED_IDLE (taken, or inherited from the process that started this one)."""
    return _SCHED_IDLE is not None and os.sched_getscheduler(0) == _SCHED_IDLE


def take_idle_policy() -> str | None:
    """The calling thread under SCHED_IDLE; None, or why not (another system,
    a sandbox that refuses the call)."""
    if _SCHED_IDLE is None:
        return "SCHED_IDLE: not on this system"
    try:
        os.sched_setscheduler(0, _SCHED_IDLE, os.sched_param(0))
    except OSError as e:
        return f"SCHED_IDLE: {e.strerror}"
    return None


def _autogroups_enabled() -> bool:
    """Off (``kernel.sched_autogroup_enabled`` = 0), nice values order every
    process against every other: the process's own is enough."""
    try:
        return AUTOGROUPS_ENABLED.read_text().strip() != "0"
    except OSError:  # no such setting: no autogroups either
        return False


def lower_session_group(increment: int, autogroup: GroupFile, sleep: Callable[[float], None] = time.sleep) -> tuple[int | None, str | None]:
    """The group's nice value raised by ``increment`` (at most 19), or None and why not."""
    try:
        shown = autogroup.read_text()
    except OSError:  # no autogroups in this kernel: nothing to lower, nothing to say
        return None, None
    if not shown.strip():  # the kernel shows nothing for a session in no group of its own (init's)
        return None, None
    found = _GROUP_NICE.search(shown)
    if found is None:
        return None, f"{autogroup}: unexpected contents {shown.strip()!r}"
    wanted = min(int(found.group(1)) + increment, MAX_NICE)
    for _ in range(_BUSY_TRIES):
        try:
            autogroup.write_text(str(wanted))
        except OSError as e:
            if e.errno != errno.EAGAIN:
                return None, f"{autogroup}: {e.strerror}"
            sleep(_BUSY_PAUSE_S)
        else:
            return wanted, None
    return None, f"{autogroup}: still busy after {_BUSY_TRIES} tries"

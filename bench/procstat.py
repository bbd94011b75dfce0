"""What the benchmarks read about processes and the machine (/proc, git):
CPU seconds and resident memory of a process and its descendants (a
supervisor's workers), each thread's CPU, the machine, and the code being
measured; and ``for_each_thread``, for the benches that set something on
every thread of a process (its CPUs, its scheduling policy)."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a supervisor's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return out


def for_each_thread(pid: int, action: Callable[[int], object]) -> None:
    """``action`` on the id of every thread of ``pid`` (threads it starts later
    inherit what the one starting them has), skipping those that end meanwhile."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            action(int(task))
        except ProcessLookupError:
            continue  # the thread ended


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def thread_cpu(pid: int) -> dict[int, float]:
    """Each thread's CPU so far, in seconds (schedstat: nanoseconds, finer than
    the clock ticks of ``cpu_seconds``)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except OSError:
            continue  # the thread ended
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of pid and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
    return total * PAGE


def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / 2**20


@dataclass(frozen=True)
class MachineCpu:
    """The machine's CPU time so far, in seconds summed over its CPUs (/proc/stat),
    and the time some runnable task waited for a CPU (/proc/pressure/cpu, "some";
    None where the kernel has no pressure stall information). The difference of
    two snapshots says what happened between them."""

    busy: float  # user, nice, system, irq, softirq: work done on this machine's CPUs
    steal: float  # time the hypervisor gave this machine's CPUs to other machines
    waited: float | None

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        waited = None if self.waited is None or other.waited is None else self.waited - other.waited
        return MachineCpu(self.busy - other.busy, self.steal - other.steal, waited)


def machine_cpu() -> MachineCpu:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest time is in user's)
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    waited: float | None = None
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
        waited = int(some.rpartition("total=")[2]) / 1e6
    except (OSError, ValueError):
        pass
    return MachineCpu((user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK, waited)


def own_cpu_seconds() -> float:
    """This process's CPU, its living descendants' and its waited-for children's
    (a load generator that has exited): what the bench itself started."""
    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    return cpu_seconds(os.getpid()) + finished.ru_utime + finished.ru_stime


def code_state() -> str:
    """The commit and a digest of the package's sources as they are now (the
    working tree may differ from the commit while work is under way)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "extproc").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "extproc"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", ""
    return f"commit {head}{' + uncommitted changes in extproc/' if dirty.strip() else ''}, extproc/*.py sha256 {digest.hexdigest()[:12]}"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }

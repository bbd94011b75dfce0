"""Child processes that cannot outlive their parent.

Used by `mirror-sampler up` and by the end-to-end tests: each child runs in
a process group of its own (a terminal's Ctrl-C reaches only the parent,
which stops the children in order) and is killed by the kernel if the parent
dies without cleaning up. It stays in the parent's session: under Linux's
autogroups a session is one scheduling group, and inside one group a
comparison observer under SCHED_IDLE (extproc/priority.py) gives way at once
to Envoy's worker when it wakes; each in a session of its own, the primary's
p99 was 0.6 ms longer (docs/compare.md, "The observers in Envoy's session").
``own_session`` keeps the former way, a session per child. Output is kept in
memory (the last lines) and optionally copied to a log file, so a caller can
wait for a start-up line and name the cause when a child fails.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from ..lifetime import die_with_parent


def _own_session_dying_with_parent() -> None:
    os.setsid()
    die_with_parent()


def _own_group_dying_with_parent() -> None:
    os.setpgid(0, 0)
    die_with_parent()


class ChildFailed(RuntimeError):
    pass


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        keep_lines: int = 2000,
        own_session: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.line_count = 0
        self._cond = threading.Condition()
        # Closed by the reader thread when the output ends.
        self._log: TextIO | None = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            text=True,
            errors="replace",
            preexec_fn=_own_session_dying_with_parent if own_session else _own_group_dying_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _read(self) -> None:
        assert self.popen.stdout is not None
        try:
            with self.popen.stdout:  # closed at end of output: no pipe outlives the child
                self._copy_lines(self.popen.stdout)
        finally:
            # The log is this thread's alone: it closes it when the output ends.
            if self._log:
                self._log.close()
            with self._cond:
                self._cond.notify_all()

    def _copy_lines(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if self._log:
                self._log.write(line + "\n")
                self._log.flush()
            with self._cond:
                self.lines.append(line)
                self.line_count += 1
                self._cond.notify_all()

    def wait_line(self, pred: Callable[[str], bool], timeout: float = 20.0, after: int = 0) -> str:
        """First line (counting from line number ``after``) that satisfies pred."""
        return self._wait_line(pred, timeout, after)[1]

    def _wait_line(self, pred: Callable[[str], bool], timeout: float, after: int) -> tuple[int, str]:
        """The first line from line number ``after`` on that satisfies pred, and its number."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self.line_count - len(self.lines)
                for i, line in enumerate(self.lines):
                    if first + i >= after and pred(line):
                        return first + i, line
                after = max(after, self.line_count)
                remaining = deadline - time.monotonic()
                if not self.alive() and not self._reader.is_alive():
                    raise ChildFailed(f"{self.name} exited with code {self.popen.returncode}: {self.last_words()}")
                if remaining <= 0:
                    raise ChildFailed(f"{self.name} did not get ready within {timeout:.0f}s: {self.last_words()}")
                self._cond.wait(min(remaining, 0.2))

    def wait_event(self, event: str, timeout: float = 20.0, after: int = 0) -> dict[str, Any]:
        """A structlog JSON line with this event name."""
        return self.wait_events(event, 1, timeout, after)[0]

    def wait_events(self, event: str, count: int, timeout: float = 20.0, after: int = 0) -> list[dict[str, Any]]:
        """``count`` structlog JSON lines with this event name (e.g. one per worker)."""

        def is_event(line: str) -> bool:
            return line.startswith("{") and f'"event": "{event}"' in line

        found: list[dict[str, Any]] = []
        while len(found) < count:
            index, line = self._wait_line(is_event, timeout, after)
            found.append(json.loads(line))
            after = index + 1
        return found

    def last_words(self, n: int = 6) -> str:
        with self._cond:
            tail = list(self.lines)[-n:]
        return " | ".join(tail) if tail else "(no output)"

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)

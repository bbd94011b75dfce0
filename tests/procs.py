"""Child processes for tests: started on loopback, stopped by pid, always.

Every process records its output lines so a test can wait for a log event
(the sampler's "serving" line carries the ports it bound) and show the log
when something fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


class Proc:
    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, name: str = "") -> None:
        self.name = name or Path(argv[0]).name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=REPO,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pred: Callable[[str], bool], timeout: float = 20.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i]):
                        return self.lines[i]
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(f"{self.name}: line not seen; output:\n{self.output()}")
                self._cond.wait(min(remaining, 0.2))

    def wait_event(self, event: str, timeout: float = 20.0, start: int = 0) -> dict[str, Any]:
        def is_event(line: str) -> bool:
            try:
                return json.loads(line).get("event") == event
            except (ValueError, AttributeError):
                return False

        return json.loads(self.wait_line(is_event, timeout, start))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-200:])

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode


class Sampler(Proc):
    """`mirror-sampler serve` as a child process on loopback ports it picks."""

    def __init__(self, env: dict[str, str], args: Sequence[str] = ()) -> None:
        base = {
            "MIRROR_LISTEN": "127.0.0.1:0",
            "MIRROR_METRICS_LISTEN": "127.0.0.1:0",
            "MIRROR_LOG_FORMAT": "json",
            "MIRROR_SHUTDOWN_GRACE": "5",
        }
        super().__init__([sys.executable, "-m", "extproc", "serve", *args], {**base, **env}, name="sampler")
        try:
            ready = self.wait_event("serving")
        except TimeoutError:
            self.stop()
            raise
        self.port: int = ready["port"]
        self.metrics_port: int | None = ready["metrics_port"]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample from /metrics, 0.0 if absent."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    return float(s.value)
        return 0.0

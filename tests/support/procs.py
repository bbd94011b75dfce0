"""Processes for tests: the real sampler on loopback, stopped by pid, always."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from extproc.stack.sampler import SamplerProcess

from .paths import REPO


class Sampler(SamplerProcess):
    """`mirror-sampler serve` as a child process on ports it picks itself."""

    def __init__(self, env: dict[str, str], args: Sequence[str] = ()) -> None:
        super().__init__({"MIRROR_SHUTDOWN_GRACE": "5", **env}, args=args, cwd=REPO)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        assert self.metrics_port is not None
        return scrape(self.metrics_port, name, labels)


def scrape(metrics_port: int | None, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the /metrics samples with this name and these labels (0.0 if none)."""
    assert metrics_port is not None, "the sampler serves no /metrics"
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(
        float(s.value)
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items())
    )


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port something already listens on, for start-up failure tests."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def wait_until(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> float:
    """Poll until pred() is true; the seconds it took. Fails the test at the
    timeout, naming ``what`` was awaited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{what}: not met within {timeout}s")


def alive(pid: int) -> bool:
    """Whether a process still runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False

"""One way to run a sampler process: ``mirror-sampler serve`` as a child.

Used by the local stack (``up``), the benchmark and the tests. The sampler
logs one JSON ``serving`` line per process once its port serves; that line
carries the ports it bound, so callers can ask for port 0.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .children import Child, ChildFailed

# What every launched sampler needs so its start-up can be read: JSON logs
# (the "serving" line) at info level at least.
BASE_ENV = {
    "MIRROR_LISTEN": "127.0.0.1:0",
    "MIRROR_METRICS_LISTEN": "127.0.0.1:0",
    "MIRROR_LOG_FORMAT": "json",
}


class SamplerProcess(Child):
    """``serve`` with these environment variables; ready when constructed."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        name: str = "sampler",
        args: Sequence[str] = (),
        log_path: Path | None = None,
        cwd: Path | None = None,
        timeout: float = 30.0,
        own_session: bool = False,
    ) -> None:
        environ = {**BASE_ENV, **env}
        argv = [sys.executable, "-m", "extproc", "serve", *args]
        super().__init__(name, argv, environ, log_path=log_path, cwd=cwd, own_session=own_session)
        workers = int(environ.get("MIRROR_WORKERS", "1") or 1)
        try:
            # One "serving" line per process: a supervisor's workers each log one.
            ready = self.wait_events("serving", workers, timeout=timeout)[0]
        except ChildFailed:
            self.stop()
            raise
        self.port: int = ready["port"]
        self.metrics_port: int | None = ready["metrics_port"]

"""The comparison's observer (`mirror-sampler compare capture`) as a child of `up`."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from ..compare.metrics import read_counts
from .children import Child, ChildFailed


class ObserverProcess(Child):
    """One observer on loopback ports it picks, its store in ``db``, its
    settings (spec.compare) in ``config``, checked against the HTTPRoutes in
    ``routes`` (None: not checked, whatever $MIRROR_CONFIG says); ready when
    constructed. ``cwd``: where ``python -m extproc`` finds the package (a
    benchmark's earlier tree)."""

    def __init__(
        self,
        config: str,
        db: Path,
        *,
        routes: str | None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        timeout: float = 30.0,
        own_session: bool = False,
    ) -> None:
        argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                "--db", str(db), "--config", config, "--routes", routes or ""]  # fmt: skip
        super().__init__("observer", argv, env, log_path=log_path, cwd=cwd, own_session=own_session)
        try:
            ready = self.wait_event("compare_serving", timeout=timeout)
        except ChildFailed:
            self.stop()
            raise
        self.port: int = ready["port"]
        self.metrics_port: int = ready["metrics_port"]
        self.db = db

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def counts(self) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str, str], float]]:
        """Its counters now (see ``compare.metrics.read_counts``); empty when it does not answer."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                return read_counts(response.read().decode())
        except OSError:
            return {}, {}

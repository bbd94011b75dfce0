"""The one helper that starts Envoy (``extproc.stack.envoy.EnvoyProcess``: `up`, the
tests, the benchmarks): what it leaves on the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.stack.envoy import EnvoyProcess

pytestmark = pytest.mark.e2e

MINIMAL = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}\nstatic_resources: {}\n"


def test_envoys_side_by_side_share_no_hot_restart_memory(tmp_path: Path) -> None:
    """Hot restart is off: no shared memory segment in /dev/shm, which Envoy leaves
    behind when it stops (one per start, for good, with --use-dynamic-base-id),
    and no base id for two Envoys on one machine to contend for."""
    (tmp_path / "envoy.yaml").write_text(MINIMAL)
    envoys = [EnvoyProcess(tmp_path / "envoy.yaml", tmp_path, name=f"envoy-{i}") for i in range(2)]
    try:
        for envoy in envoys:
            envoy.start()
        for envoy in envoys:
            assert envoy.admin("/ready").strip() == "LIVE"
            maps = Path(f"/proc/{envoy.pid}/maps").read_text()
            assert "/dev/shm/envoy_shared_memory" not in maps
    finally:
        for envoy in envoys:
            envoy.stop()

"""`mirror-sampler up` as a user runs it: ready line, live view, clean stop,
and a clear non-zero exit when a part cannot start."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from extproc.children import Child
from extproc.config import Settings, build_policy
from extproc.gateway import DEFAULT_CONFIG, Gateway, GatewayError, view_rows
from procs import REPO, alive, busy_port

pytestmark = pytest.mark.e2e

READY = re.compile(r"gateway ready: (http://127\.0\.0\.1:\d+) \(Envoy admin (http://[\d.:]+)\)")


def children_of(pid: int) -> set[int]:
    """Direct children of pid, from /proc (the children run in their own sessions)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def up(*args: str, env: dict[str, str] | None = None) -> Child:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return Child("up", [sys.executable, "-m", "extproc", "up", "--listener-port", "0", "--admin-port", "0", *args], {**environ, **(env or {})}, cwd=REPO)


def test_up_runs_the_default_example_and_stops_every_child_on_sigterm() -> None:
    gw = up()
    try:
        line = gw.wait_line(lambda s: "gateway ready" in s, timeout=60)
        url, admin = READY.search(line).groups()  # type: ignore[union-attr]
        assert "curl -H 'Host: backends.example'" in line
        kids = children_of(gw.pid)
        assert len(kids) == 4  # envoy, sampler, backend, backend-2
        req = urllib.request.Request(url + "/get", headers={"Host": "backends.example", "x-request-id": "alice"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        assert urllib.request.urlopen(admin + "/ready", timeout=5).read().strip() == b"LIVE"
        # Not a terminal: the live view comes as periodic lines.
        gw.wait_line(lambda s: s.startswith("primary") and "backend-2" in s and "50%" in s, timeout=20)
        gw.signal(signal.SIGTERM)
        assert gw.popen.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(k) for k in kids)
    finally:
        gw.stop()


def test_port_in_use_exits_non_zero_naming_the_part() -> None:
    with busy_port() as port:
        gw = up("--listener-port", str(port))
        try:
            assert gw.popen.wait(60) == 1
            assert f"--listener-port: port {port} on 127.0.0.1 is not free" in gw.output()
        finally:
            gw.stop()


def test_a_child_failing_at_start_stops_the_others(tmp_path: Path) -> None:
    with busy_port() as port:
        # The sampler cannot bind its metrics port: the error names it, and the
        # echo backends already started are stopped.
        gw = Gateway(
            Settings.load({"MIRROR_CONFIG": str(DEFAULT_CONFIG)}),
            listener_port=0,
            admin_port=0,
            log_dir=tmp_path,
            sampler_env={"MIRROR_METRICS_LISTEN": f"127.0.0.1:{port}"},
        )
        with pytest.raises(GatewayError, match=r"sampler 0 exited with code 1: .*MIRROR_METRICS_LISTEN"):
            gw.start()
        assert set(gw.backends) == {"backend", "backend-2"}
        assert not any(child.alive() for child in gw.backends.values())
        assert gw.envoy is None


def test_view_rows_show_achieved_and_configured_ratio() -> None:
    policy = build_policy(Settings.load({"MIRROR_CONFIG": str(DEFAULT_CONFIG)}), DEFAULT_CONFIG.read_text())
    rows = view_rows(policy, {"cluster.backend.upstream_rq_total": 200, "cluster.backend-2.upstream_rq_total": 97})
    assert any(r.split() == ["backend", "200"] for r in rows)
    assert any(r.split() == ["backend-2", "97", "200", "48.5%", "50%"] for r in rows)

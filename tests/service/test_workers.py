"""`serve` with MIRROR_WORKERS=2: a supervisor and two worker processes on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from extproc.stack.children import Child
from extproc.wire import PROCESS_METHOD, HeaderMap, HeaderValue, HttpHeaders, ProcessingRequest, ProcessingResponse
from tests.support.paths import REPO
from tests.support.procs import alive, busy_port, scrape, wait_until

# `mirror-sampler serve` runs extproc.server.workers.serve(): one server, or a supervisor.
SERVE = [sys.executable, "-m", "extproc", "serve"]

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  rules:
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow}
        percent: 100
    backendRefs: [{name: primary}]
"""


class Workers(Child):
    def __init__(self, env: dict[str, str], workers: int = 2) -> None:
        base = {
            "MIRROR_LISTEN": "127.0.0.1:0",
            "MIRROR_METRICS_LISTEN": "127.0.0.1:0",
            "MIRROR_LOG_FORMAT": "json",
            "MIRROR_SHUTDOWN_GRACE": "2",
            "MIRROR_WORKERS": str(workers),
        }
        super().__init__("supervisor", SERVE, {**base, **env}, cwd=REPO)
        try:
            sup = self.wait_event("supervising", timeout=30)
        except Exception:
            self.stop()
            raise
        self.port: int = sup["port"]
        self.pids: list[int] = sup["pids"]
        self.metrics_ports = {}
        for line in self.output().splitlines():
            if '"event": "serving"' in line:
                ev = _json(line)
                self.metrics_ports[ev["worker"]] = ev["metrics_port"]


def _json(line: str) -> dict[str, Any]:
    import json

    event: dict[str, Any] = json.loads(line)
    return event


@pytest.fixture
def route_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTE)
    return path


@pytest.fixture
def workers(route_file: Path, transport: str) -> Iterator[Workers]:
    w = Workers({"MIRROR_CONFIG": str(route_file), "MIRROR_TRANSPORT": transport})
    try:
        yield w
    finally:
        w.stop()


def _request(key: bytes) -> ProcessingRequest:
    return ProcessingRequest(
        request_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":path", raw_value=b"/"), HeaderValue(key="x-request-id", raw_value=key)])
        )
    )


def ask_on_new_connections(port: int, count: int) -> list[bool]:
    """One request per new TCP connection (a fresh channel each): whether it was mirrored."""

    async def one(i: int) -> bool:
        # A distinct channel argument keeps gRPC from sharing one subchannel.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("test.connection", i)]) as ch:
            call = ch.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)()
            await call.write(_request(f"key-{i}".encode()))
            resp = await call.read()
            await call.done_writing()
            return bool(resp.request_headers.response.header_mutation.set_headers)

    async def main() -> list[bool]:
        return list(await asyncio.gather(*(one(i) for i in range(count))))

    return asyncio.run(main())


def streams_per_worker(w: Workers) -> dict[int, float]:
    return {i: scrape(port, "mirror_sampler_streams_started_total") for i, port in w.metrics_ports.items()}


def test_two_workers_share_the_port_and_both_answer(workers: Workers) -> None:
    assert len(workers.pids) == 2 and len(set(workers.pids)) == 2
    assert sorted(workers.metrics_ports) == [0, 1]
    assert all(ask_on_new_connections(workers.port, 40))
    per_worker = streams_per_worker(workers)
    # The kernel hashes each connection to one worker: 40 connections all on
    # one worker would be a 1 in 2**39 event.
    assert all(n > 0 for n in per_worker.values()), per_worker
    assert sum(per_worker.values()) == 40


def test_killed_worker_is_restarted(workers: Workers) -> None:
    victim = workers.pids[0]
    mark = workers.line_count
    os.kill(victim, signal.SIGKILL)
    exited = workers.wait_event("worker_exited", timeout=10, after=mark)
    assert exited["pid"] == victim and "SIGKILL" in exited["status"]
    restarted = workers.wait_event("worker_restarted", timeout=30, after=mark)
    assert restarted["worker"] == 0 and restarted["pid"] != victim and alive(restarted["pid"])
    assert alive(workers.pids[1])
    assert all(ask_on_new_connections(workers.port, 20))


def test_sigterm_stops_every_worker_cleanly(workers: Workers) -> None:
    assert all(ask_on_new_connections(workers.port, 4))
    workers.signal(signal.SIGTERM)
    assert workers.popen.wait(20) == 0
    out = workers.output()
    assert out.count('"event": "worker_stopped"') == 2 and "exit code 0" in out
    assert not any(alive(p) for p in workers.pids)
    # The port is free again: nothing listens on it or holds it. Connections
    # the workers closed may sit in TIME-WAIT, which SO_REUSEADDR (as every
    # server binds) lets a new listener ignore.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", workers.port))
        s.listen()


def test_restart_right_after_stop_takes_the_same_port(workers: Workers) -> None:
    """Connections closed by the stopping workers leave the port in TIME-WAIT;
    a new supervisor on the same port starts anyway."""
    assert all(ask_on_new_connections(workers.port, 8))
    workers.signal(signal.SIGTERM)
    assert workers.popen.wait(20) == 0
    env = {
        "MIRROR_BACKEND": "shadow",
        "MIRROR_LISTEN": f"127.0.0.1:{workers.port}",
        "MIRROR_WORKERS": "2",
        "MIRROR_LOG_FORMAT": "json",
        "MIRROR_METRICS_LISTEN": "off",
    }
    child = Child("again", SERVE, env, cwd=REPO)
    try:
        assert len(child.wait_events("serving", 2, timeout=30)) == 2
        assert all(ask_on_new_connections(workers.port, 4))
    finally:
        child.stop()


def test_sighup_reaches_every_worker(workers: Workers) -> None:
    def unchanged() -> dict[int, float]:
        return {i: scrape(p, "mirror_sampler_reloads_total", {"result": "unchanged"}) for i, p in workers.metrics_ports.items()}

    before = unchanged()
    assert len(before) == 2, "a metrics port per worker"
    workers.signal(signal.SIGHUP)
    # The file did not change: every worker re-read it and counted "unchanged".
    wait_until(lambda: all(unchanged()[i] > before[i] for i in before), 10, "every worker to re-read the file on SIGHUP")


def test_file_change_reaches_every_worker(workers: Workers, route_file: Path) -> None:
    route_file.write_text(ROUTE.replace("percent: 100", "percent: 0"))

    def oks() -> list[float]:
        return [scrape(p, "mirror_sampler_reloads_total", {"result": "ok"}) for p in workers.metrics_ports.values()]

    assert len(workers.metrics_ports) == 2, "a metrics port per worker"
    wait_until(lambda: all(n >= 1 for n in oks()), 10, "every worker to reload the edit")
    assert not any(ask_on_new_connections(workers.port, 10))


def test_busy_port_fails_loudly_with_workers() -> None:
    with busy_port() as port:
        child = Child(
            "supervisor",
            SERVE,
            {"MIRROR_BACKEND": "shadow", "MIRROR_LISTEN": f"127.0.0.1:{port}", "MIRROR_WORKERS": "2", "MIRROR_LOG_FORMAT": "json"},
            cwd=REPO,
        )
        code = child.popen.wait(30)
        child.stop()
    assert code == 1
    assert f"MIRROR_LISTEN: cannot listen on 127.0.0.1:{port}" in child.output()


def test_busy_port_still_fails_loudly_with_one_worker() -> None:
    with busy_port() as port:
        child = Child(
            "sampler",
            SERVE,
            {"MIRROR_BACKEND": "shadow", "MIRROR_LISTEN": f"127.0.0.1:{port}", "MIRROR_METRICS_LISTEN": "off", "MIRROR_LOG_FORMAT": "json"},
            cwd=REPO,
        )
        code = child.popen.wait(30)
        child.stop()
    assert code == 1
    assert "MIRROR_LISTEN: cannot listen" in child.output()


def test_a_second_supervisor_cannot_share_the_port(workers: Workers) -> None:
    child = Child(
        "second",
        SERVE,
        {"MIRROR_BACKEND": "shadow", "MIRROR_LISTEN": f"127.0.0.1:{workers.port}", "MIRROR_WORKERS": "2", "MIRROR_LOG_FORMAT": "json"},
        cwd=REPO,
    )
    code = child.popen.wait(30)
    child.stop()
    assert code == 1 and "MIRROR_LISTEN: cannot listen" in child.output()


def test_a_metrics_port_past_65535_for_a_worker_is_a_setting_error() -> None:
    """Worker 1 of two would serve metrics on 65536: refused before anything starts,
    naming the setting (it was worker 1 exiting during start-up)."""
    child = Child(
        "supervisor",
        SERVE,
        {
            "MIRROR_BACKEND": "shadow",
            "MIRROR_LISTEN": "127.0.0.1:0",
            "MIRROR_METRICS_LISTEN": "127.0.0.1:65535",
            "MIRROR_WORKERS": "2",
            "MIRROR_LOG_FORMAT": "json",
        },
        cwd=REPO,
    )
    code = child.popen.wait(30)
    child.stop()
    assert code == 2, child.output()
    assert "MIRROR_METRICS_LISTEN: " in child.output() and "at most 65534" in child.output()
    assert "exited during start-up" not in child.output() and "65536" not in child.output()


def test_a_worker_that_cannot_start_fails_start_up(tmp_path: Path) -> None:
    with busy_port() as port:
        # Worker 0's metrics port is taken.
        child = Child(
            "supervisor",
            SERVE,
            {
                "MIRROR_BACKEND": "shadow",
                "MIRROR_LISTEN": "127.0.0.1:0",
                "MIRROR_METRICS_LISTEN": f"127.0.0.1:{port}",
                "MIRROR_WORKERS": "2",
                "MIRROR_LOG_FORMAT": "json",
            },
            cwd=REPO,
        )
        code = child.popen.wait(30)
        child.stop()
    assert code == 1
    assert "MIRROR_METRICS_LISTEN" in child.output() and "exited during start-up" in child.output()

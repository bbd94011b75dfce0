"""The server process: start-up errors, reload (file, SIGHUP), SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.wire import PROCESS_METHOD, HeaderMap, HeaderValue, HttpHeaders, ProcessingRequest, ProcessingResponse
from tests.support.paths import REPO
from tests.support.procs import Sampler, wait_until

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  rules:
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {{name: shadow}}
        percent: {percent}
    backendRefs: [{{name: primary}}]
"""


def request(key: bytes) -> ProcessingRequest:
    return ProcessingRequest(
        request_headers=HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":path", raw_value=b"/"), HeaderValue(key="x-request-id", raw_value=key)])
        )
    )


def sampled(port: int, key: bytes = b"alice") -> bool:
    async def main() -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)()
            await call.write(request(key))
            resp = await call.read()
            await call.done_writing()
            return bool(resp.request_headers.response.header_mutation.set_headers)

    return asyncio.run(main())


@pytest.fixture
def route_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTE.format(percent=0))
    return path


def test_bad_environment_exits_non_zero_naming_the_variable() -> None:
    env = {**os.environ, "MIRROR_BACKEND": "shadow", "MIRROR_FRACTION": "5/0", "MIRROR_SLOTS": "x"}
    out = subprocess.run([sys.executable, "-m", "extproc", "serve"], env=env, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2
    assert "MIRROR_FRACTION" in out.stderr and "denominator" in out.stderr
    assert "MIRROR_SLOTS" in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_exits_non_zero(route_file: Path, transport: str) -> None:
    first = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file)})
    try:
        env = {**os.environ, "MIRROR_CONFIG": str(route_file), "MIRROR_LISTEN": f"127.0.0.1:{first.port}", "MIRROR_METRICS_LISTEN": "off"}
        out = subprocess.run([sys.executable, "-m", "extproc", "serve"], env=env, capture_output=True, text=True, timeout=30, cwd=REPO)
        assert out.returncode == 1
        assert "MIRROR_LISTEN" in out.stderr
    finally:
        first.stop()


def test_bad_tls_files_name_the_setting(tmp_path: Path, transport: str) -> None:
    """Each transport checks the PEM files the same way, before listening: grpcio's
    own failure (at add_secure_port) used to be reported as MIRROR_LISTEN."""
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage\n")
    base = {**os.environ, "MIRROR_BACKEND": "shadow", "MIRROR_TRANSPORT": transport, "MIRROR_LISTEN": "127.0.0.1:0"}
    base["MIRROR_METRICS_LISTEN"] = "off"
    cases = [
        ({"MIRROR_TLS_CERT": str(bad), "MIRROR_TLS_KEY": str(bad)}, "MIRROR_TLS_CERT/MIRROR_TLS_KEY: ", "not a matching PEM"),
        ({"MIRROR_TLS_CERT": str(tmp_path / "nope.pem"), "MIRROR_TLS_KEY": str(bad)}, "MIRROR_TLS_CERT: cannot read ", "nope.pem"),
    ]
    for tls_env, names, says in cases:
        env = {**base, **tls_env}
        out = subprocess.run([sys.executable, "-m", "extproc", "serve"], env=env, capture_output=True, text=True, timeout=30, cwd=REPO)
        assert out.returncode == 1, out.stderr
        assert names in out.stderr and says in out.stderr, out.stderr
        assert "MIRROR_LISTEN" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_file_edit_reloads_within_two_seconds(route_file: Path, transport: str) -> None:
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file)})
    try:
        assert not sampled(s.port)
        route_file.write_text(ROUTE.format(percent=100))
        wait_until(lambda: sampled(s.port), timeout=2.0, what="the edited file to be in force")
        assert s.metric("mirror_sampler_reloads_total", {"result": "ok"}) == 1
    finally:
        s.stop()


def test_invalid_edit_is_logged_counted_and_ignored(route_file: Path, transport: str) -> None:
    route_file.write_text(ROUTE.format(percent=100))
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file)})
    try:
        mark = s.line_count
        route_file.write_text(ROUTE.format(percent=101))
        rejected = s.wait_event("reload_rejected", timeout=5, after=mark)
        assert any("spec.rules[0].filters[0].requestMirror.percent" in p for p in rejected["problems"])
        assert s.metric("mirror_sampler_reloads_total", {"result": "invalid"}) >= 1
        assert sampled(s.port)  # the previous policy (100%) stays
        assert s.popen.poll() is None
    finally:
        s.stop()


def test_writes_next_to_the_config_cause_no_reload(route_file: Path, transport: str) -> None:
    """A log written next to the config (say `serve > sampler.log`) is not the config."""
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file), "MIRROR_LOG_LEVEL": "debug"})
    try:
        neighbour = route_file.parent / "sampler.log"
        for i in range(30):
            neighbour.write_text(f"line {i}\n" * (i + 1))
        # The positive witness: the watcher saw the writes (and judged them foreign).
        seen = s.wait_event("config_folder_changed", timeout=5)
        assert seen["files"] == ["sampler.log"] and seen["concerns_config"] is False
        counts = {r: s.metric("mirror_sampler_reloads_total", {"result": r}) for r in ("ok", "unchanged", "invalid", "needs_envoy_config")}
        assert counts == {"ok": 0, "unchanged": 0, "invalid": 0, "needs_envoy_config": 0}
        assert '"event": "reload' not in s.output()
    finally:
        s.stop()


def test_one_invalid_edit_is_logged_and_counted_once(route_file: Path, transport: str) -> None:
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file)})
    try:
        mark = s.line_count
        route_file.write_text(ROUTE.format(percent=101))
        s.wait_event("reload_rejected", timeout=5, after=mark)
        # More events in the folder, and the same invalid content written again.
        for i in range(10):
            (route_file.parent / "sampler.log").write_text(f"{i}\n")
        route_file.write_text(ROUTE.format(percent=101))
        route_file.write_text(ROUTE.format(percent=100))
        s.wait_event("reloaded", timeout=5, after=mark)
        assert s.metric("mirror_sampler_reloads_total", {"result": "invalid"}) == 1
        assert s.output().count('"event": "reload_rejected"') == 1
    finally:
        s.stop()


def test_sighup_forces_reload(route_file: Path, transport: str) -> None:
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file)})
    try:
        mark = s.line_count
        s.signal(signal.SIGHUP)
        # Same content: nothing to swap, but the reload ran and was counted.
        wait_until(lambda: s.metric("mirror_sampler_reloads_total", {"result": "unchanged"}) >= 1, 5)
        assert s.popen.poll() is None
        route_file.write_text(ROUTE.format(percent=100))
        s.signal(signal.SIGHUP)
        s.wait_event("reloaded", timeout=5, after=mark)
        assert sampled(s.port)
    finally:
        s.stop()


def test_sigterm_drains_open_streams_and_refuses_new_ones(route_file: Path, transport: str) -> None:
    route_file.write_text(ROUTE.format(percent=100))
    s = Sampler(
        {"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file), "MIRROR_DRAIN_DELAY": "1.5", "MIRROR_SHUTDOWN_GRACE": "60"}
    )

    def served(resp: ProcessingResponse) -> bool:
        return bool(resp.request_headers.response.header_mutation.set_headers)

    async def main() -> tuple[int, bool, bool]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            open_stream = ch.stream_stream(PROCESS_METHOD, ProcessingRequest.SerializeToString, ProcessingResponse.FromString)()
            await open_stream.write(request(b"alice"))
            assert served(await open_stream.read())
            mark = s.line_count
            s.signal(signal.SIGTERM)
            await asyncio.to_thread(s.wait_event, "draining", 5, mark)
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            # Past the drain delay: new streams are refused.
            await asyncio.to_thread(s.wait_event, "refusing_new_streams", 5, mark)
            refused = False
            try:
                sampled_after = await asyncio.to_thread(sampled, s.port)
            except grpc.aio.AioRpcError:
                refused = True
            else:
                refused = not sampled_after
            # The stream opened before SIGTERM is still answered within the grace.
            await open_stream.write(request(b"alice"))
            still_served = served(await open_stream.read())
            await open_stream.done_writing()
            assert await open_stream.read() == grpc.aio.EOF
            return health.status, refused, still_served

    try:
        status, refused, still_served = asyncio.run(main())
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert refused
        assert still_served
        # With its last stream closed the process exits without waiting out the grace (60 s).
        assert s.popen.wait(20) == 0
        assert any('"event": "stopped"' in line for line in s.lines)
    finally:
        s.stop()


def test_structural_edit_is_refused_until_envoy_config_is_regenerated(route_file: Path, transport: str) -> None:
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(route_file)})
    try:
        mark = s.line_count
        # A second mirror target: Envoy's routes have no variant for it.
        route_file.write_text(
            ROUTE.format(percent=100).replace(
                "    backendRefs:",
                "    - type: RequestMirror\n      requestMirror:\n        backendRef: {name: shadow-2}\n    backendRefs:",
            )
        )
        rejected = s.wait_event("reload_rejected", timeout=5, after=mark)
        assert "regenerate Envoy's configuration" in rejected["problems"][0]
        assert s.metric("mirror_sampler_reloads_total", {"result": "needs_envoy_config"}) == 1
        assert not sampled(s.port)  # the 0% policy stays
    finally:
        s.stop()


def test_configmap_symlink_swaps_are_all_seen(tmp_path: Path, transport: str) -> None:
    """Kubernetes mounts a ConfigMap as name -> ..data/name, ..data -> ..<timestamp>/,
    and updates it by swapping ..data; the directory it points to is deleted."""
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: int, percent: int) -> None:
        target = mount / f"..v{version}"
        target.mkdir()
        (target / "routes.yaml").write_text(ROUTE.format(percent=percent))
        staging = mount / "..data_tmp"
        staging.symlink_to(target.name)
        os.replace(staging, mount / "..data")

    publish(0, 0)
    (mount / "routes.yaml").symlink_to("..data/routes.yaml")
    s = Sampler({"MIRROR_TRANSPORT": transport, "MIRROR_CONFIG": str(mount / "routes.yaml")})
    try:
        for version, percent in ((1, 100), (2, 0), (3, 100)):
            publish(version, percent)
            wait_until(lambda: sampled(s.port) is (percent == 100), timeout=3)  # noqa: B023 - called before the loop moves on
        assert s.metric("mirror_sampler_reloads_total", {"result": "ok"}) == 3
    finally:
        s.stop()

"""bench/compare_parts.py's configurations, which the compare benches measure:
each accepted by the real Envoy and changed only where it says, and the
alternative capture of the shadow doing on a real Envoy what it stands for
(a measurement of a capture that captures nothing would be a false figure)."""

from __future__ import annotations

import base64
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.access_log import messages, start_sink
from bench.compare_cost import COMPARE_YAML
from bench.compare_parts import (
    EDITS,
    TAG_ONLY_SCRIPT,
    UPSTREAM_CAPTURE_CLUSTER,
    UPSTREAM_CAPTURE_HEADER,
    primary_tag_only,
    upstream_capture,
)
from bench.module_instructions import send
from bench.testbed import LOOPBACK, MIRROR, PRIMARY, bench_policy, free_port, upstream_yaml
from bench.variants import listener_manager
from extproc.compare.cli import parse_config_text
from extproc.compare.envoy import CAPTURE_FILTER, CAPTURE_SCRIPT, TARGET_HEADER, render_with_capture
from extproc.envoy.render import Address, Topology
from extproc.stack.envoy import EnvoyProcess, validate
from tests.support.procs import wait_until

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from envoy_data_plane.envoy.service.accesslog.v3 import StreamAccessLogsMessage


def on_config(tmp_path: Path, listener_port: int, backends: dict[str, int], observer_port: int) -> dict[str, Any]:
    """The bench's `on`: the inline Lua decision, one rule mirroring 100%, the capture points."""
    settings = tmp_path / "compare.yaml"
    settings.write_text(COMPARE_YAML)
    compare = parse_config_text(COMPARE_YAML, str(settings))
    topology = Topology(
        listener=Address(LOOPBACK, listener_port),
        admin=Address(LOOPBACK, 0),
        backends={name: Address(LOOPBACK, port) for name, port in backends.items()},
        inline=True,
    )
    rendered: dict[str, Any] = yaml.safe_load(render_with_capture(bench_policy(100), topology, compare, [Address(LOOPBACK, observer_port)]))
    return rendered


def some_on_config(tmp_path: Path) -> dict[str, Any]:
    return on_config(tmp_path, 10000, {PRIMARY: 10001, MIRROR: 10002}, 10003)


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["staticResources"]["clusters"]}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_envoy_accepts(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(EDITS[name](some_on_config(tmp_path))))
    checked = validate(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_upstream_capture_sends_the_compared_copy_to_a_cluster_of_its_own_and_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    on = some_on_config(tmp_path)
    edited = upstream_capture(copy.deepcopy(on))
    assert clusters(edited)[MIRROR] == clusters(on)[MIRROR]
    own = clusters(edited)[UPSTREAM_CAPTURE_CLUSTER]
    assert own["loadAssignment"]["endpoints"] == clusters(on)[MIRROR]["loadAssignment"]["endpoints"]
    filters = own["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["httpFilters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.lua", "envoy.filters.http.upstream_codec"]
    routes = listener_manager(edited, "ingress")["routeConfig"]["virtualHosts"][0]["routes"]
    (variant,) = [r for r in routes if " mirror " in r["name"]]
    assert [p["cluster"] for p in variant["route"]["requestMirrorPolicies"]] == [UPSTREAM_CAPTURE_CLUSTER]
    router = next(f for f in listener_manager(edited, "ingress")["httpFilters"] if f["name"] == "envoy.filters.http.router")
    (log,) = router["typedConfig"]["upstreamLog"]
    assert log["filter"] == {"headerFilter": {"header": {"name": TARGET_HEADER, "presentMatch": True}}}


def test_primary_tag_only_changes_the_primary_script_alone(tmp_path: Path) -> None:
    on = some_on_config(tmp_path)
    edited = primary_tag_only(copy.deepcopy(on))
    routes = listener_manager(edited, "ingress")["routeConfig"]["virtualHosts"][0]["routes"]
    (variant,) = [r for r in routes if " mirror " in r["name"]]
    assert variant["typedPerFilterConfig"][CAPTURE_FILTER]["name"] == TAG_ONLY_SCRIPT
    shadow = listener_manager(edited, "mirror-sampler-compare-shadow")["routeConfig"]
    assert shadow == listener_manager(on, "mirror-sampler-compare-shadow")["routeConfig"]
    assert shadow["virtualHosts"][0]["routes"][0]["typedPerFilterConfig"][CAPTURE_FILTER]["name"] == CAPTURE_SCRIPT


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[dict[str, int]]:
    ports = {PRIMARY: free_port(), MIRROR: free_port()}
    path = tmp_path / "upstream.yaml"
    path.write_text(upstream_yaml(ports, 0))
    envoy = EnvoyProcess(path, tmp_path, name="upstream").start()
    try:
        yield ports
    finally:
        envoy.stop()


def test_upstream_capture_logs_each_compared_copy_with_the_shadows_headers_and_body(tmp_path: Path, upstream: dict[str, int]) -> None:
    sink_port, raw = free_port(), tmp_path / "sink.raw"
    sink = start_sink(sink_port, tmp_path / "sink.bytes", raw)
    listener_port = free_port()
    path = tmp_path / "upstream-capture.yaml"
    path.write_text(yaml.safe_dump(upstream_capture(on_config(tmp_path, listener_port, upstream, sink_port))))
    envoy = EnvoyProcess(path, tmp_path, name="upstream-capture", extra_args=("--concurrency", "1")).start()
    keys = [f"k-{i}" for i in range(10)]
    try:
        send(listener_port, keys)

        def shadow_entries() -> list[Any]:
            batches = [StreamAccessLogsMessage().parse(m).http_logs for m in messages(raw)]
            entries = [e for batch in batches if batch is not None for e in batch.log_entry]
            return [e for e in entries if e.response is not None and UPSTREAM_CAPTURE_HEADER in e.response.response_headers]

        wait_until(lambda: len(shadow_entries()) >= len(keys), timeout=15, what="the shadows' entries")
        entries = shadow_entries()
    finally:
        envoy.stop()
        sink.terminate()
        sink.wait(timeout=30)
    assert sorted(e.request.request_id for e in entries) == sorted(keys)
    for entry in entries:
        headers_b64, body_b64 = entry.response.response_headers[UPSTREAM_CAPTURE_HEADER].split(" ")
        lines = base64.b64decode(headers_b64).decode().split("\n")
        assert ":status: 200" in lines
        assert base64.b64decode(body_b64) == f"{MIRROR}\n".encode()  # the upstream's answer for the mirror
        assert entry.request.request_headers[TARGET_HEADER] == MIRROR

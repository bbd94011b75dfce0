"""End to end: what `convert envoy-gateway --inline module` writes, translated by Envoy
Gateway's own translator (`egctl x translate`; skipped unless built, as in
tests/service/test_convert_envoy_gateway_module.py), run by the real Envoy (two workers)
with the module built here at the allowlisted path and echo backends for the Services.

The xDS egctl produces is made static for a bare Envoy, and nothing else is changed:
EDS clusters get their endpoints inline (the Service's cluster IP becomes its echo
backend's loopback port), RDS listeners their route configuration inline, the module's
path the one built here. Envoy Gateway's Envoy generates x-request-id (the key): the
request ids the primary backend saw decide, per request and by the Policy of the original
routes, exactly which ids each shadow must see.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.convert.envoy_gateway import ModuleEngine, convert_envoy_gateway
from extproc.convert.module_delivery import MODULE_PATH
from extproc.core.plan import Plan
from extproc.module.support import module_for
from extproc.stack import envoy as envoy_stack
from extproc.stack.backend import EchoProcess
from extproc.stack.envoy import EnvoyProcess
from tests.e2e.test_module import VERSIONS
from tests.owners.tools import egctl
from tests.service.test_convert_envoy_gateway_module import WORLD, services
from tests.support.harness import Client
from tests.support.paths import CONFORMANCE
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e

PATHS = ("/percent-mirror", "/percent-mirror-fraction", "/percent-multi-mirror-and-modify-headers")
REQUESTS = 120
LISTENER = "gateway-conformance-infra/same-namespace/http"  # Envoy Gateway's name for the Gateway's listener


def translate(tmp: Path, docs: list[dict[str, Any]]) -> dict[str, Any]:
    (tmp / "in.yaml").write_text(yaml.safe_dump_all(docs))
    translate = ["x", "translate", "-f", str(tmp / "in.yaml"), "--from", "gateway-api", "--to", "xds", "-t", "all", "-o", "yaml"]
    done = subprocess.run([str(egctl()), *translate], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (xds,) = (d["xds"] for d in yaml.safe_load_all(done.stdout) if d and "xds" in d)
    (configs,) = xds.values()
    return {c["@type"].rpartition(".")[2]: c for c in configs["configs"]}


def static_bootstrap(dump: dict[str, Any], ports: dict[str, int], module: str) -> dict[str, Any]:
    """egctl's xDS for one Gateway as a static bootstrap for a bare Envoy on loopback."""
    endpoints = {e["endpointConfig"]["clusterName"]: e["endpointConfig"] for e in dump["EndpointsConfigDump"]["dynamicEndpointConfigs"]}
    clusters = []
    for entry in dump["ClustersConfigDump"]["dynamicActiveClusters"]:
        cluster = copy.deepcopy(entry["cluster"])
        cluster.pop("@type")
        assignment = copy.deepcopy(endpoints[cluster["name"]])
        assignment.pop("@type")
        for locality in assignment["endpoints"]:
            for lb in locality["lbEndpoints"]:
                address = lb["endpoint"]["address"]["socketAddress"]
                address.update(address="127.0.0.1", portValue=ports[address["address"]])
        cluster.pop("edsClusterConfig")
        cluster.update(type="STATIC", loadAssignment=assignment)
        clusters.append(cluster)
    routes = {r["routeConfig"]["name"]: r["routeConfig"] for r in dump["RoutesConfigDump"]["dynamicRouteConfigs"]}
    listeners = []
    for entry in dump["ListenersConfigDump"]["dynamicListeners"]:
        listener = copy.deepcopy(entry["activeState"]["listener"])
        listener.pop("@type")
        listener["address"]["socketAddress"].update(address="127.0.0.1", portValue=0)
        chains = [*listener.get("filterChains", []), *([listener["defaultFilterChain"]] if "defaultFilterChain" in listener else [])]
        for chain in chains:
            for network_filter in chain["filters"]:
                manager = network_filter["typedConfig"]
                if "rds" not in manager:
                    continue
                route_config = copy.deepcopy(routes[manager.pop("rds")["routeConfigName"]])
                route_config.pop("@type")
                manager["routeConfig"] = route_config
                for http_filter in manager["httpFilters"]:
                    source = http_filter.get("typedConfig", {}).get("dynamicModuleConfig", {}).get("module", {}).get("local", {})
                    if source:
                        assert source["filename"] == MODULE_PATH
                        source["filename"] = module
        listeners.append(listener)
    admin = {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}}
    return {"admin": admin, "staticResources": {"listeners": listeners, "clusters": clusters}}


@pytest.fixture
def echoes() -> Iterator[dict[str, EchoProcess]]:
    started: dict[str, EchoProcess] = {}
    try:
        for name in ("infra-backend-v1", "infra-backend-v2", "infra-backend-v3"):
            started[name] = EchoProcess(name)
        yield started
    finally:
        for echo in started.values():
            echo.stop()


@pytest.mark.parametrize("binary", VERSIONS)
def test_envoy_gateway_translation_mirrors_exactly_what_the_module_decides(
    tmp_path: Path, echoes: dict[str, EchoProcess], binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the project's Envoy and on 1.39 (Envoy Gateway 1.9's; MIRROR_TEST_ENVOY_1_39)."""
    if binary:
        monkeypatch.setattr(envoy_stack, "envoy_binary", lambda: binary)
    conversion = convert_envoy_gateway([CONFORMANCE], module=ModuleEngine())
    routes = list(yaml.safe_load_all(conversion.files["httproutes.yaml"]))
    world_services = services(routes)
    converted = [d for text in conversion.files.values() for d in yaml.safe_load_all(text) if d]
    dump = translate(tmp_path, [*yaml.safe_load_all(WORLD), *world_services, *converted])
    ports = {s["spec"]["clusterIP"]: echoes[s["metadata"]["name"]].port for s in world_services}
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(static_bootstrap(dump, ports, module_for(envoy_stack.envoy_binary()))))
    envoy = EnvoyProcess(config, tmp_path, extra_args=["--concurrency", "2"])
    try:
        envoy.start()
        client = Client(f"http://127.0.0.1:{envoy.listener_ports()[LISTENER]}")
        for path in PATHS:
            for i in range(REQUESTS):
                status, _ = client.request(f"{path}/{i}", "gateway.example", {})
                assert status == 200, (path, i, status)
        client.close()
        policy = build_policy(Settings.load({"MIRROR_CONFIG": "x"}), CONFORMANCE.read_text())
        plan = Plan(policy)
        # The echo logs before it answers, but its log reaches us through a reader thread.
        primary_echo = echoes["infra-backend-v1"]
        wait_until(lambda: len(primary_echo.echoed()) >= REQUESTS * len(PATHS), 15, "the requests at the primary")
        primary = primary_echo.echoed()
        assert len(primary) == REQUESTS * len(PATHS)
        expected: dict[str, set[tuple[str, str]]] = {"infra-backend-v2": set(), "infra-backend-v3": set()}
        for doc in primary:
            request_id = doc["headers"]["X-Request-Id"][0]
            request = {
                ":authority": b"gateway.example",
                ":path": doc["path"].encode(),
                ":method": b"GET",
                "x-request-id": request_id.encode(),
            }
            trace = plan.trace(request)
            for target in trace.targets:
                if target.outcome == "mirrored":
                    expected[target.target.backend].add((doc["path"], request_id))
        assert all(expected.values())

        def seen(name: str) -> set[tuple[str, str]]:
            return {(d["path"], d["headers"]["X-Request-Id"][0]) for d in echoes[name].echoed()}

        for name, want in expected.items():

            def arrived(name: str = name, count: int = len(want)) -> bool:
                return len(seen(name)) >= count

            wait_until(arrived, 15, f"the mirrors at {name}")
            assert seen(name) == want, name
        # No shadow sees a slot header; the module's counters agree.
        for name in expected:
            assert not any("X-Mirror-Cluster-0" in d["headers"] for d in echoes[name].echoed())
        mirrored = sum(
            v
            for k, v in envoy.stats().items()
            if k.startswith("dynamicmodulescustom.mirror_sampler_decisions") and k.endswith(".outcome.mirrored")
        )
        assert mirrored == sum(len(v) for v in expected.values())
    finally:
        envoy.stop()

